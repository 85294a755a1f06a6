"""Hostile and clumsy input (issue 33's list, and docs/reliability.md's table): each is one line naming
the key or file and the fix, exit code 2, never a traceback, and never loses or rewrites earlier results."""
from pathlib import Path

from aelab.cli.main import main


def cli(capfd, *argv):
    """`aelab ARGV` through the console script's entry point: (exit code, stdout, stderr)."""
    try:
        code = main(list(argv))
    except SystemExit as e:
        code = e.code
    out, err = capfd.readouterr()
    return code, out, err


def files(folder: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_resume_that_trains_nothing_leaves_the_run_as_it_was(run_copy, capfd):
    """A finished run resumed: "nothing to do", and not a byte of it changes (Hydra's .hydra/ records
    included, which Hydra writes before the job starts); a resume that fails (a truncated checkpoint)
    leaves it as it was too."""
    before = files(run_copy)
    code, out, err = cli(capfd, "train", f"resume={run_copy}")
    assert code == 0 and "nothing to do" in out, err
    assert files(run_copy) == before
    checkpoint = run_copy / "checkpoint.pt"
    checkpoint.write_bytes(checkpoint.read_bytes()[:5000])
    before = files(run_copy)
    code, out, err = cli(capfd, "train", f"resume={run_copy}", "trainer.epochs=2")
    assert code == 2 and "unreadable or truncated" in err and "Traceback" not in err
    assert files(run_copy) == before


def test_resume_of_a_finished_sweep_leaves_it_as_it_was(sweep, capfd):
    """Every job finished: each says so, and neither the jobs' records nor multirun.yaml change."""
    before = files(sweep)
    code, out, err = cli(capfd, "train", f"resume={sweep}")
    assert code == 0 and out.count("finished already, its results kept") == 4, err
    assert files(sweep) == before
