"""`pip install .` gives `import phi3v, recipe, ucf101` outside the checkout, with the pinned requirements."""

import shutil
import subprocess
import sys
from importlib.metadata import PathDistribution
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_pip_install_gives_importable_packages_with_pinned_requirements(tmp_path):
    # A copy of what the build reads, so the in-tree build leaves nothing in the checkout; no
    # build isolation and no dependencies: offline and fast (the venv has setuptools).
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "requirements.txt", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for package in ("phi3v", "recipe", "ucf101"):
        shutil.copytree(ROOT / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--no-index", "--target", str(target), str(source)], check=True, timeout=300)

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    code = ("import phi3v, recipe.runner, phi3v.generate, phi3v.vllm_plugin, ucf101.tree; "
            "print(phi3v.__file__); print(recipe.runner.__file__); print(ucf101.tree.__file__)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=elsewhere, env={"PYTHONPATH": str(target)},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert all(line.startswith(str(target)) for line in proc.stdout.split()), proc.stdout

    (dist_info,) = target.glob("phi3v_finetune-*.dist-info")
    dist = PathDistribution(dist_info)
    pinned = [line.split("#")[0].strip() for line in (ROOT / "requirements.txt").read_text().splitlines()]
    assert sorted(r.replace(" ", "") for r in dist.requires) == sorted(p for p in pinned if p)
    entry_points = {(e.group, e.name): e.value for e in dist.entry_points}
    assert entry_points[("vllm.general_plugins", "phi3v")] == "phi3v.vllm_plugin:register"
    assert entry_points[("console_scripts", "phi3v-generate")] == "phi3v.generate:main"
