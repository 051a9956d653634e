#!/usr/bin/env bash
# The first command of a session with a lent GPU: environment report, wheels, GPU tests, the benchmarks in priority
# order and the ahead-of-time kernel compilation, each step under its own time limit inside one overall budget (the
# device ends a command at 10 minutes). Every step writes under $OUT as it goes: what is there comes back even when
# the command is cut short. One failing step never stops the later ones.
#
# Usage, from the repository root on the device machine (carry .whl if it exists):
#   OUT=... GIT_COMMIT=<sha> bash benchmarks/gpu_session.sh [--budget SECONDS] [--only NAME[,NAME]]
#                                                           [--cap NAME=SECONDS ...] [--dry-run]
#     --budget S   seconds for the whole script (default 540, leaving the device's 600 s limit some room)
#     --only N     run only the named steps (repeatable or comma-separated); env.json is always written
#     --cap N=S    step N's time limit instead of its default (repeatable), to share one call's budget between steps
#     --dry-run    hide CUDA and skip the wheel install: the same commands run on the CPU, where the benchmarks take
#                  their tiny interpreted shapes, so this script is testable without a GPU (tests/test_gpu_session.py)
#   GIT_COMMIT: the device receives the working tree without .git, so the commit travels in the environment.
# Steps: wheels, gpu_tests, bench_<name> for each entry of BENCHMARKS, profile, memory_fit, compare_reference, aot.
# $OUT receives env.json, session.log (every step's output), gpu_tests.xml, bench_<name>.json, profile.json,
# memory_fit.json, compare_<config>.json, aot.json. The device returns at most 8 files from $OUT: once BENCHMARKS grows past that, split the session into calls
# with --only.
# compare_reference runs benchmarks/compare_reference.py (this engine against facebookresearch/jepa on the same GPU)
# on ViT-L/16-224 and ViT-H/16-384 (the tiny config in a dry run) when a checkout of the reference is at
# $VJEPA_REFERENCE (default .ref/jepa, ignored by git). On the CPU machine, before the device call:
#   git -C <its mirror from the search tool's fetch> worktree add "$PWD/.ref/jepa" HEAD
#   git -C .ref/jepa rev-parse HEAD > .ref/jepa/COMMIT   # its .git file names the mirror, which does not travel
#   bash ../shared/tools/gpu_wheels.sh pyyaml typing-extensions   # the reference's imports need pyyaml; pydantic
#                                                     # (DeepSpeed's) needs a typing-extensions newer than some images'
# then carry [".whl", ".ref"] and start the command with GIT_COMMIT=<this commit> written out (the device's copy of
# the tree has no .git). Without a checkout the step is skipped, saying so.
# Exit code: the number of steps that failed or ran out of time (0: every step passed or was skipped).
set -uo pipefail
cd "$(dirname "$0")/.."

# benchmark name (benchmarks/test_bench_<name>.py) : time limit in seconds, in priority order. Attention comes first:
# its results fill models/attention_table.json (auto's backends); then the whole training step (ViT-L/224 and
# ViT-H/384 in both mask modes, the eval forward, the GEMM peak). All the limits add up to about 34 minutes and all
# steps would write 14 files (the device returns 8), while a task is lent 15 minutes of device time, starts included:
# one session gets one full call (or two short ones), so pick with --only what no committed result covers yet and
# share the call with --cap. The first GPU session, one call of --budget 570:
#   --only gpu_tests,bench_train_step,compare_reference --cap gpu_tests=150 --cap bench_train_step=200
#   --cap compare_reference=190
# (correctness of the compiled kernels, the step's figures in both mask modes and DeepSpeed modes, the reference
# ratios); later sessions: --only bench_attention,bench_tubelet_embed,bench_masked_l1_loss,bench_ema, then
# --only profile,memory_fit,bench_loader,aot. The wheels step runs whenever .whl holds wheels.
BENCHMARKS=(attention:180 train_step:300 tubelet_embed:180 masked_l1_loss:90 ema:120 loader:120)
RESERVE=15  # seconds at the end of the budget kept for the summary

usage() { sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
BUDGET=540 DRY=0 ONLY=""
declare -A CAP=()
while (($#)); do
  case $1 in
    --budget|--only|--cap) (($# >= 2)) || { echo "gpu_session.sh: $1 needs a value" >&2; exit 2; }
                           set -- "$1=$2" "${@:3}" ;;
    --budget=*) BUDGET=${1#*=}; shift ;;
    --only=*) ONLY+=",${1#*=}"; shift ;;
    --cap=*=*) c=${1#--cap=}; CAP[${c%%=*}]=${c#*=}; shift ;;
    --cap=*) echo "gpu_session.sh: --cap needs NAME=SECONDS, got '${1#--cap=}'" >&2; exit 2 ;;
    --dry-run) DRY=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "gpu_session.sh: unknown argument '$1'" >&2; usage >&2; exit 2 ;;
  esac
done
[[ $BUDGET =~ ^[0-9]+$ ]] || { echo "gpu_session.sh: --budget needs whole seconds, got '$BUDGET'" >&2; exit 2; }
: "${OUT:?set OUT to the folder that receives the results}"
STEPS=(wheels gpu_tests)
for b in "${BENCHMARKS[@]}"; do STEPS+=("bench_${b%%:*}"); done
STEPS+=(profile memory_fit compare_reference aot)
for name in ${ONLY//,/ } "${!CAP[@]}"; do
  [[ " ${STEPS[*]} " == *" $name "* ]] && continue
  echo "gpu_session.sh: unknown step '$name' (steps: ${STEPS[*]})" >&2; exit 2
done
for name in "${!CAP[@]}"; do
  [[ ${CAP[$name]} =~ ^[0-9]+$ ]] || { echo "gpu_session.sh: --cap $name needs whole seconds, got '${CAP[$name]}'" >&2; exit 2; }
done

mkdir -p "$OUT"
LOG=$OUT/session.log
STEP_OUT=$(mktemp)  # the running step's output, outside $OUT (the device returns at most 8 files)
trap 'rm -f "$STEP_OUT"' EXIT
START=$SECONDS
PY=${PYTHON:-python3}
[[ -z ${PYTHON:-} && -x .venv/bin/python ]] && PY=.venv/bin/python  # a CPU checkout; the device has no .venv
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
((DRY)) && export CUDA_VISIBLE_DEVICES=""
q() { printf '%q' "$1"; }
say() { echo "$*" | tee -a "$LOG"; }
selected() { [[ -z $ONLY || ",$ONLY," == *",$1,"* ]]; }

RESULTS=() FAILED=0
record() {  # NAME STATUS SECONDS
  RESULTS+=("$(printf '%-24s %-40s %5ss' "$1" "$2" "$3")")
  [[ $2 == failed* || $2 == partial* || $2 == timeout || $2 == no-time ]] && FAILED=$((FAILED + 1))
  say "== $1: $2 (${3}s)"
}

# step NAME CAP COMMAND [EXIT_CODE ...]: COMMAND (a bash string) under min(CAP, what the budget has left); the extra
# exit codes also count as success. A step gets SIGTERM at its limit and SIGKILL 10 s later.
step() {
  local name=$1 cap=${CAP[$1]:-$2} cmd=$3 ok=" 0 ${*:4} " left limit t0 rc status sig
  selected "$name" || return 0
  left=$((BUDGET - (SECONDS - START) - RESERVE))
  if ((left < 10)); then record "$name" no-time 0; return 0; fi
  limit=$((cap < left ? cap : left))
  say "== $name (limit ${limit}s): $cmd"
  t0=$SECONDS
  : >"$STEP_OUT"
  # benchmarks stop starting new cases a little before the limit (a fifth, at most 20 s), so pytest still ends
  # normally and writes their JSON; the cases it skipped make the step "partial". A test still running at the limit
  # gets SIGINT: pytest stops it and still writes its junit XML and benchmark JSON (SIGTERM would lose both; timeout
  # handles SIGINT itself, so its child starts with Python's handler even where SIGINT came in ignored)
  sig=TERM; [[ $cmd == *" -m pytest "* ]] && sig=INT
  VJEPA_BENCH_DEADLINE=$(($(date +%s) + limit - (limit / 5 < 20 ? limit / 5 : 20))) \
    timeout -s "$sig" -k 15 "$limit" bash -c "$cmd" 2>&1 | tee -a "$LOG" "$STEP_OUT"
  rc=${PIPESTATUS[0]}
  if ((rc == 124 || rc == 137)); then status=timeout
  elif [[ $ok != *" $rc "* ]]; then status="failed (exit $rc)"
  elif grep -q VJEPA_BENCH_DEADLINE "$STEP_OUT"; then status="partial (time budget)"
  else status=ok; [[ $rc != 0 ]] && status="ok (exit $rc)"; fi
  record "$name" "$status" $((SECONDS - t0))
}

skip() { selected "$1" && record "$1" "skipped: $2" 0; }

# (a) environment report: always, whatever --only says
say "== gpu_session.sh: budget ${BUDGET}s, dry run $DRY, out $OUT, python $PY"
timeout 60 "$PY" benchmarks/env_report.py "$OUT/env.json" 2>&1 | tee -a "$LOG" || say "== env report failed"

# (b) wheels the device image lacks (bash ../shared/tools/gpu_wheels.sh fills .whl/ on the CPU machine)
wheels="$(q "$PY") -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site"
if ! compgen -G ".whl/*.whl" >/dev/null; then
  skip wheels "no .whl/*.whl"
elif ((DRY)); then
  skip wheels "dry run, not run: $wheels .whl/*.whl"
else  # whatever --only names: every later step needs them (deepspeed, PyAV) and a fresh machine lacks them
  only=$ONLY ONLY=""
  step wheels 90 "$wheels .whl/*.whl"
  ONLY=$only
  [[ -d /tmp/site ]] && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi

# (c) every GPU test, compiled (tests/conftest.py interprets Triton unless told not to), the kernels' first; near the
# limit the rest skip naming VJEPA_BENCH_DEADLINE (-rs prints it: the step is then partial) and the XML is written;
# exit 5: none collected
step gpu_tests 240 "TRITON_INTERPRET=0 $(q "$PY") -m pytest tests -m gpu -q -rs -p no:cacheprovider --junitxml=$(q "$OUT/gpu_tests.xml")" 5

# (d) the benchmarks, most important first
for entry in "${BENCHMARKS[@]}"; do
  name=${entry%%:*} file=benchmarks/test_bench_${entry%%:*}.py
  if [[ ! -f $file ]]; then skip "bench_$name" "$file absent"; continue; fi
  step "bench_$name" "${entry##*:}" \
    "$(q "$PY") -m pytest $file --benchmark-only -q -rs -p no:cacheprovider --benchmark-json=$(q "$OUT/bench_$name.json")"
done

# (e) where a step's time goes: device-busy fraction, idle gaps, per-phase device time, top kernels (a few KB of JSON
# instead of traces of tens of MB; benchmarks/profile_step.py)
profiled=(configs/vitl16.json configs/vith16_384.json) extra=""
((DRY)) && profiled=(configs/tiny_synthetic.json) extra="--data.batch_size=2"
cmd="$(q "$PY") benchmarks/profile_step.py"
for cfg in "${profiled[@]}"; do cmd+=" --config $cfg"; done
step profile 180 "$cmd --json $(q "$OUT/profile.json") $extra"

# (f) the small-GPU recipe measured (README "On one small GPU"): ViT-L/16-224 with the allocator capped at 24 GiB at
# the batches the README quotes, checkpointing off and on; ViT-H/16-384 at its batch 10 capped at 80 GiB (the recipe
# must fit one 80 GB GPU); benchmarks/memory_fit.py. The dry run: the tiny config, uncapped.
fits=("--config configs/vitl16.json --cap-gib 24 --batch 8,12,16,24" "--config configs/vith16_384.json --cap-gib 80")
((DRY)) && fits=("--config configs/tiny_synthetic.json --batch 1,2")
cmd="rc=0" append=""
for fit in "${fits[@]}"; do
  cmd+="; $(q "$PY") benchmarks/memory_fit.py $fit --json $(q "$OUT/memory_fit.json") $append || rc=1"
  append="--append"
done
step memory_fit 240 "$cmd; exit \$rc"

# (g) this engine against the reference on the same device, when a checkout of it was carried
REFERENCE=${VJEPA_REFERENCE:-.ref/jepa}
if [[ ! -d $REFERENCE/src || ! -d $REFERENCE/app ]]; then
  skip compare_reference "no facebookresearch/jepa checkout at $REFERENCE (see the usage above)"
else
  configs=(vitl16 vith16_384)
  ((DRY)) && configs=(tiny_synthetic)
  cmd="rc=0"
  for cfg in "${configs[@]}"; do
    cmd+="; $(q "$PY") benchmarks/compare_reference.py --reference $(q "$REFERENCE") --config configs/$cfg.json"
    cmd+=" --steps 5 --json $(q "$OUT/compare_$cfg.json") || rc=1"
  done
  step compare_reference 300 "$cmd; exit \$rc"
fi

# (h) compile every kernel configuration for sm_90 (works on a CPU too; not under the interpreter)
if [[ -f kernels/aot.py ]]; then
  step aot 90 "env -u TRITON_INTERPRET $(q "$PY") -m kernels.aot --json > $(q "$OUT/aot.json")"
else
  skip aot "kernels/aot.py absent"
fi

# summary: the benchmark table, the comparison with the reference, the profile and memory fit, then one line per step
reports=()
for f in "$OUT"/bench_*.json "$OUT"/compare_*.json "$OUT"/profile.json "$OUT"/memory_fit.json; do
  [[ -f $f ]] && reports+=("$f")
done
if ((${#reports[@]})); then
  "$PY" benchmarks/report.py "${reports[@]}" 2>&1 | tee -a "$LOG"
fi
say "== steps (${BUDGET}s budget, $((SECONDS - START))s used; copy \$OUT to the results_dir that env.json names):"
for line in "${RESULTS[@]}"; do say "   $line"; done
exit "$FAILED"
