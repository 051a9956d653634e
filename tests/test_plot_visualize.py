"""Pictures of a run: engine.plot's figures from metrics.csv, engine.visualize's PCA GIF from a checkpoint."""

import csv
import math

import pytest
import torch
from PIL import Image

from engine import plot, visualize
from engine.loop import train
from tests.video_faults import write_video

# every figure misses a column (older runs), MFU is logged but empty (a CPU run), one loss is not finite
COLUMNS = ["step", "epoch", "loss", "lr", "momentum", "context_tokens_0", "samples_per_s", "mfu", "data_wait_frac",
           "target_std_tokens", "pred_std", "target_rank", "elapsed_s"]


def write_metrics(folder, rows: int = 6) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "metrics.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(COLUMNS)
        for i in range(rows):
            loss = "nan" if i == 3 else 0.8 * math.exp(-i / 3)
            writer.writerow([i * 10, 0, loss, 1e-4 * (i + 1), 0.998 + i * 1e-4, 90.5, 30 + i, "", 0.05, 0.5, 0.1,
                             40 - i, i * 2.0])


def test_plot_run_writes_the_figures_without_missing_columns(tmp_path, capsys):
    write_metrics(tmp_path / "run")
    assert plot.main([str(tmp_path / "run")]) == 0
    names = ["loss.png", "schedules.png", "throughput.png", "collapse.png"]
    assert capsys.readouterr().out.split() == [str(tmp_path / "run" / "plots" / n) for n in names]
    for name in names:
        with Image.open(tmp_path / "run" / "plots" / name) as image:
            assert image.format == "PNG" and image.width > 100
    # a column of panels: collapse.png has 3 of its 4 (no target_std_clips), schedules.png 2 of 3 (no wd)
    with Image.open(tmp_path / "run" / "plots" / "collapse.png") as a, \
            Image.open(tmp_path / "run" / "plots" / "schedules.png") as b:
        assert a.height > b.height
    written = plot.plot_run(tmp_path / "run", tmp_path / "elsewhere")
    assert [p.name for p in written] == names and all(p.parent == tmp_path / "elsewhere" for p in written)


def test_plot_errors_name_the_file(tmp_path, capsys):
    assert plot.main([str(tmp_path / "absent")]) == 1
    assert "absent not found" in capsys.readouterr().err
    (tmp_path / "run").mkdir()
    assert plot.main([str(tmp_path / "run")]) == 1
    assert f"{tmp_path / 'run' / 'metrics.csv'} not found" in capsys.readouterr().err
    write_metrics(tmp_path / "run", rows=0)
    assert plot.main([str(tmp_path / "run")]) == 1
    assert "metrics.csv has no rows" in capsys.readouterr().err


def test_pca_rgb_first_channel_follows_the_main_direction():
    grid = (2, 4, 5)
    n, d = 40, 16
    gen = torch.Generator().manual_seed(0)
    a = torch.linspace(-1, 1, n)[torch.randperm(n, generator=gen)]  # the main direction's coordinate, shuffled
    u = torch.zeros(d)
    u[3], u[7] = 0.8, -0.6  # largest loading positive: the sign pca_rgb keeps
    minor = torch.randn(n, d, generator=gen) * 0.05  # the other components, smaller than a's spread
    rgb = pca_rgb_of(10 * a[:, None] * u + minor, grid)
    assert rgb.shape == (*grid, 3) and rgb.min() >= 0 and rgb.max() <= 1
    red = rgb[..., 0].flatten()[a.argsort()]
    assert (red.diff() >= 0).all() and red[0] == 0 and red[-1] == 1  # clipped at the 1st / 99th percentiles
    # the sign comes from the components, not from the call: negated features give the inverted colour
    assert torch.allclose(pca_rgb_of(-(10 * a[:, None] * u + minor), grid)[..., 0], 1 - rgb[..., 0], atol=1e-5)


def pca_rgb_of(features: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
    return visualize.pca_rgb(features[None], grid)  # the encoder's (1, N, D) output


def test_visualize_run_folder_and_checkpoint_file(tiny_config, tmp_path, capsys):
    train(tiny_config("--meta.max_steps=2", f"--logging.folder={tmp_path}/run"))  # clips of 8 frames, step 2, 64 px
    video = write_video(tmp_path / "clip.webm", 16)
    assert visualize.main(["--checkpoint", str(tmp_path / "run"), "--video", video]) == 0
    out = tmp_path / "clip.pca.gif"
    assert capsys.readouterr().out.split()[-1] == str(out)
    with Image.open(out) as gif:
        assert gif.format == "GIF" and gif.n_frames == 8 and gif.size == (128, 64)  # input | PCA
    # a checkpoint file of ours carries its config: the same clip settings; here overridden
    out = visualize.visualize(tmp_path / "run" / "jepa-latest.pth.tar", video, tmp_path / "file.gif", frames=4,
                              size=32, frame_step=4)
    with Image.open(out) as gif:
        assert gif.n_frames == 4 and gif.size == (64, 32)


def test_visualize_errors(tmp_path, capsys):
    assert visualize.main(["--checkpoint", str(tmp_path), "--video", str(tmp_path / "absent.mp4")]) == 1
    assert "video not found" in capsys.readouterr().err
    video = write_video(tmp_path / "clip.webm", 4)
    assert visualize.main(["--checkpoint", str(tmp_path / "absent.pth.tar"), "--video", video]) == 1
    assert "checkpoint not found" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="no config.json"):
        visualize.visualize(tmp_path, video)
