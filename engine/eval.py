"""Entry point: `python engine/eval.py --config configs/eval/X.json --checkpoint RUN_FOLDER_OR_FILE
[--random-init] [--section.key=value ...]`: attentive probes on the frozen encoder, results.json in logging.folder.
Several GPUs: `deepspeed --num_gpus N engine/eval.py ...` (or torchrun): the clips are split over the ranks and the probe's
gradients averaged, data.batch_size per rank, as V1's batch per GPU. SIGTERM or Ctrl-C saves the probe at the next
batch and exits with 143 / 130; the same command continues it (engine/evaluation/resume.py)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: the repository on the path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.config import ConfigError  # noqa: E402
from models.pretrained import UnreadableCheckpoint  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="V-JEPA frozen evaluation (attentive probe)",
                                     epilog="Any --section.key=value overrides the config, e.g. --optimization.epochs=5")
    parser.add_argument("--config", required=True, help="JSON eval config (overrides of V1's K400 probe recipe)")
    parser.add_argument("--checkpoint", required=True, help="a training run folder, a file exported from one, or a "
                        "released V-JEPA file")
    parser.add_argument("--random-init", action="store_true", help="the checkpoint's architecture with fresh "
                        "weights: the baseline the pretrained encoder must beat")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help="set by the deepspeed launcher "
                        "(the process group is read from its environment)")
    args, overrides = parser.parse_known_args(argv)
    from engine.checkpoint import CheckpointWriteError
    from engine.data.bad_videos import TooManyBadVideos
    from engine.data.dataset import SampleError
    from engine.data.loader import own_message
    from engine.evaluation.config import load_eval_config
    from engine.evaluation.runner import Stopped, run_eval
    from engine.faults import INTERRUPTED_EXIT_CODE
    from engine.process_group import leave_process_group

    clean = False
    try:
        cfg = load_eval_config(args.config, overrides)
        run_eval(cfg, args.checkpoint, random_init=args.random_init)
        clean = True
    except (ConfigError, FileNotFoundError, UnreadableCheckpoint) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (SampleError, TooManyBadVideos, CheckpointWriteError) as e:  # the message says what to fix
        print(f"error: {own_message(e)}", file=sys.stderr)
        return 1
    except Stopped as e:  # SIGTERM or Ctrl-C, the probe saved: the same command continues
        clean = True
        return e.exit_code
    except KeyboardInterrupt:  # Ctrl-C outside the probe's training (loading, the feature cache), or a second one
        print("interrupted: the probe files saved so far stand; the same command continues from them",
              file=sys.stderr)
        return INTERRUPTED_EXIT_CODE
    finally:
        leave_process_group(clean=clean)
    return 0


if __name__ == "__main__":
    sys.exit(main())
