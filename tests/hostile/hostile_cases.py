"""What several hostile-input modules share: every command's output files and directories, and the
quick run refused with nothing written (pytest puts this folder on sys.path: `from hostile_cases import ...`)."""

from nmtrain.cli.main import app

from helpers import QUICK, assert_refused, cli, snapshot


# Every command's every output file: (command line with {out} for the output path, the field named).
FILE_OUTPUTS = {
    "prune -o": (["prune", "{model}", "-o", "{out}", "--pattern", "2:4"], "--output"),
    "prune --report": (["prune", "{model}", "-o", "{tmp}/ok.pt", "--pattern", "2:4", "--report", "{out}"], "--report"),
    "convert --to compressed": (["convert", "{run}", "--to", "compressed", "--out", "{out}"], "--out"),
    "convert --to dense": (["convert", "{model}", "--to", "dense", "--out", "{out}"], "--out"),
    "convert --to semi-structured": (["convert", "{model}", "--to", "semi-structured", "--pattern", "2:4",
                                      "--out", "{out}"], "--out"),
}
# Every command's output directory; a run file inside it that is not a regular file counts too.
DIR_OUTPUTS = {
    "train --out": (["train", *QUICK, "--out", "{out}"], "--out"),
    "adaprune --out": (["adaprune", "{run}", "--pattern", "2:4", "--iters", "1", "--calib-samples", "8",
                        "--no-progress", "--out", "{out}"], "--out"),
    "compare --out": (["compare", *QUICK, "--methods", "dense", "--patterns", "2:4", "--out", "{out}"], "--out"),
}


def output_args(template, trained, tmp_path, out):
    names = {"model": trained / "model.pt", "run": trained, "tmp": tmp_path, "out": out}
    return [a.format(**{k: str(v) for k, v in names.items()}) for a in template]


COMPARE = ["compare", "data.dataset=synthetic", "data.batch_size=64", "model.name=mlp", "--methods", "dense,srste",
           "--patterns", "2:4", "--no-progress"]


def refused(tmp_path, needle, *args, command="train"):
    """``nmtrain COMMAND`` (the quick synthetic run) with ``args`` is refused, and nothing under tmp_path changes."""
    out = tmp_path / "run"
    before = snapshot(tmp_path)
    base = ["train", *QUICK] if command == "train" else COMPARE
    result = cli.invoke(app, [*base, "--out", str(out), *args])
    assert_refused(result, needle, before, snapshot(tmp_path))
    assert not out.exists()
