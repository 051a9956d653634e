"""Entry point: `python engine/train.py --config X.json [--section.key=value ...]`, or under `deepspeed`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script (`python engine/train.py`, the deepspeed launcher): repo on the path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.config import ConfigError, load_config  # noqa: E402


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description="V-JEPA pretraining", epilog="Any --section.key=value overrides "
                                     "the config, e.g. --optimization.lr=1e-4 --data.datasets='[\"a.csv\"]'")
    parser.add_argument("--config", help="JSON config (overrides of the paper's ViT-L/16 defaults)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")
    parser.add_argument("--dry-run", action="store_true", help="print parameters, FLOPs per clip, a per-GPU memory "
                        "estimate and the global-batch check, then exit (no data, no GPU, no process group)")
    parser.add_argument("--profile", type=int, metavar="N", default=None, help="profile N training steps after "
                        "warm-up with torch.profiler: a Chrome trace with a named range per phase of the step, written "
                        "to the run folder as trace.json (same as --meta.profile_steps=N)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None,
                        help="set by the deepspeed launcher (torchrun sets LOCAL_RANK instead)")
    return parser.parse_known_args(argv)


def main(argv: list[str] | None = None) -> int:
    args, overrides = parse_args(argv)
    if args.profile is not None:
        overrides = [*overrides, f"--meta.profile_steps={args.profile}"]
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print(json.dumps(cfg.to_dict(), indent=2))
        return 0
    if args.dry_run:
        from engine.dry_run import main as dry_run

        return dry_run(cfg, args.config)
    from engine.checkpoint import CheckpointWriteError, UnreadableCheckpoint
    from engine.data.bad_videos import TooManyBadVideos
    from engine.data.dataset import SampleError
    from engine.data.loader import own_message
    from engine.faults import INTERRUPTED_EXIT_CODE, NonFiniteLoss
    from engine.loop import train  # heavy imports only when training
    from engine.process_group import launched_local_rank, leave_process_group

    clean = False
    try:
        summary = train(cfg, local_rank=launched_local_rank(args.local_rank))
        clean = True
    except (ConfigError, SampleError, TooManyBadVideos, NonFiniteLoss, UnreadableCheckpoint,
            CheckpointWriteError) as e:  # the message says what to fix
        config = isinstance(e, ConfigError)
        print(f"{'config error' if config else 'error'}: {own_message(e)}", file=sys.stderr)
        return 2 if config else 1
    except KeyboardInterrupt:  # Ctrl-C before the first step, or a second one
        print("interrupted: stopped at once; the last checkpoint stands and the same command continues from it",
              file=sys.stderr)
        return INTERRUPTED_EXIT_CODE
    finally:
        leave_process_group(clean=clean)
    return summary["exit_code"]  # 143 after SIGTERM, 130 after Ctrl-C (rerun to continue), else 0


if __name__ == "__main__":
    sys.exit(main())
