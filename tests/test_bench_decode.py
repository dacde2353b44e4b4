"""eval.bench_decode: the batched-decode benchmark runs, checks both modes agree, and records its section."""

from eval.bench_decode import SECTION, main


def test_bench_decode_writes_its_section_and_keeps_the_others(tmp_path):
    record = tmp_path / "BENCHMARKS.md"
    record.write_text("# Benchmarks\n\n## Other\n\nkept\n")
    main(["--lm", "128x2", "--sessions", "1", "3", "--tokens", "4", "--markdown", str(record)])
    text = record.read_text()
    assert "## Other\n\nkept" in text and text.count(SECTION) == 1
    rows = [line for line in text.splitlines() if line.startswith("| 128x2 |")]
    assert [row.split("|")[2].strip() for row in rows] == ["1", "3"]
    assert float(rows[1].split("|")[5]) > 1.5  # the three sessions shared passes (mean batch)
