"""Every relative link in README.md, TRAINING.md and docs/**/*.md resolves (scripts/check_doc_links.py)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _checker():
    spec = importlib.util.spec_from_file_location("check_doc_links", ROOT / "scripts" / "check_doc_links.py")
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


def test_every_relative_link_of_the_docs_resolves(capsys: pytest.CaptureFixture[str]) -> None:
    checker = _checker()
    assert checker.find_broken(ROOT) == []
    assert checker.main(["--root", str(ROOT)]) == 0
    assert "0 broken link(s)" in capsys.readouterr().out


def test_checker_reports_missing_files_and_anchors_and_skips_code_and_urls(tmp_path: Path) -> None:
    checker = _checker()
    (tmp_path / "docs" / "data").mkdir(parents=True)
    (tmp_path / "docs" / "data" / "curve.json").write_text("{}")
    (tmp_path / "TRAINING.md").write_text("# Training WavFlow\n\n## Feature extraction\n")
    (tmp_path / "docs" / "b.md").write_text(
        "# Bench\n\n## Model speed (`scripts/bench/bench_model.py`)\n\n## Model speed (`scripts/bench/bench_model.py`)\n"
    )
    (tmp_path / "README.md").write_text(
        "[ok](TRAINING.md#feature-extraction) [dir](docs/data/) ![img](docs/data/curve.json)\n"
        "[second heading](docs/b.md#model-speed-scriptsbenchbench_modelpy-1) [web](https://example.com/x.md)\n"
        "[mail](mailto:a@b.c) [self](#training-nothing)\n"
        "`[in code](missing_in_span.md)`\n"
        "\n"
        "    [indented code](missing_in_block.md)\n"
        "\n"
        "```\n[fenced](missing_in_fence.md)\n```\n"
        "[gone](docs/gone.md) [bad anchor](TRAINING.md#no-such-heading)\n"
        "[ref]: docs/also_gone.md\n"
    )
    broken = checker.find_broken(tmp_path)
    assert broken == [
        "README.md:3: #training-nothing (no heading with anchor #training-nothing)",
        "README.md:11: docs/gone.md (no such file or folder)",
        "README.md:11: TRAINING.md#no-such-heading (no heading with anchor #no-such-heading)",
        "README.md:12: docs/also_gone.md (no such file or folder)",
    ]
    assert checker.main(["--root", str(tmp_path)]) == 1


@pytest.mark.parametrize(
    "heading, slug",
    [
        ("Every mode on its own", "every-mode-on-its-own"),
        ("GPU: one NVIDIA H200", "gpu-one-nvidia-h200"),
        ("Built-in data sets ([datasets.md](datasets.md))", "built-in-data-sets-datasetsmd"),
        ("The procedural set's stages (earlier recipe)", "the-procedural-sets-stages-earlier-recipe"),
        ("Does it learn? (`scripts/bench/learning_benchmark.sh`)", "does-it-learn-scriptsbenchlearning_benchmarksh"),
    ],
)
def test_github_slug_rules(heading: str, slug: str) -> None:
    assert _checker().github_slug(heading) == slug
