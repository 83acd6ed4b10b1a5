"""The README's first screen and CI must agree on the commands a new user runs."""
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands():
    text = (ROOT / "README.md").read_text()
    block = text.split("```bash\n", 1)[1].split("```", 1)[0]
    return [line.strip() for line in block.splitlines() if line.strip()]


def test_ci_runs_the_readme_test_command():
    install_and_test = readme_commands()[2]
    test_command = install_and_test.split("&&", 1)[1].strip()
    ci_lines = [l.strip() for l in (ROOT / ".ci/run").read_text().splitlines()]
    assert test_command in ci_lines, f"{test_command!r} is not a line of .ci/run"


def test_ci_installs_the_requirements_and_the_cpu_torch():
    ci = (ROOT / ".ci/run").read_text()
    assert "torch==2.13.0" in ci and "-r requirements.txt pytest" in ci


def test_demo_command_follows_the_torch_install():
    assert readme_commands()[0].startswith("pip install torch ")
    assert readme_commands()[1].endswith("python train_grpo.py")
