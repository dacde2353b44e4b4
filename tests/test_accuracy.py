"""The accuracy harness: option extraction, the three manifest layouts, and a full run."""

import json
from pathlib import Path

import pytest

from eval.accuracy import (ManifestError, QAItem, clip_seed, extract_choice, load_manifest, markdown_table, run_accuracy,
                           summarise)
from eval.public_formats import write_mvbench, write_videomme
from eval.shapesworld import write_split
from server.cli import main
from vlm.model import VLM, VLMConfig

CANDIDATES = ("red", "green", "top-left", "left")


@pytest.mark.parametrize("text, expected", [
    ("red", 0), ("Red.", 0), ("The answer is green.", 1), ("B", 1), ("(A)", 0), ("C. top-left", 2),
    ("Answer: D", 3), ("option b", 1), ("top-left", 2), ("it is at the top-left", 2), ("left", 3),
    ("red or green", None), ("purple", None), ("", None), ("E", None), ("Because", None),
])
def test_extract_choice_reads_text_letters_and_refuses_ambiguity(text, expected):
    assert extract_choice(text, CANDIDATES) == expected


@pytest.fixture(scope="module")
def shapesworld_manifest(tmp_path_factory):
    return write_split("val", 3, tmp_path_factory.mktemp("sw"))


def test_mvbench_and_videomme_fixtures_load_to_the_same_items_as_shapesworld(shapesworld_manifest, tmp_path):
    native = load_manifest(shapesworld_manifest)
    mvbench = load_manifest(write_mvbench(shapesworld_manifest, tmp_path / "mvbench"),
                            video_root=shapesworld_manifest.parent)
    videomme = load_manifest(write_videomme(shapesworld_manifest, tmp_path / "videomme.json"),
                             video_root=shapesworld_manifest.parent)
    parquet = load_manifest(write_videomme(shapesworld_manifest, tmp_path / "videomme.parquet"),
                            video_root=shapesworld_manifest.parent)

    def key(item: QAItem):
        return (item.video, item.question, item.candidates, item.answer_index, item.type)

    assert len(native) > 10
    for other in (mvbench, videomme, parquet):
        assert sorted(map(key, other)) == sorted(map(key, native))
    assert all(item.video.exists() for item in native)


@pytest.mark.parametrize("content, message", [
    ("not json", "cannot read"), ('{"a": 1}', "list"), ('[{"video": "x.mp4"}]', "bad manifest row"),
])
def test_bad_manifests_raise_a_clear_error(content, message, tmp_path):
    path = tmp_path / "m.json"
    path.write_text(content)
    with pytest.raises(ManifestError, match=message):
        load_manifest(path, "shapesworld")


def test_a_run_counts_every_question_per_type_with_chance_and_prefill_ratio(shapesworld_manifest):
    model = VLM.from_config(VLMConfig.from_name("vidsieve-tiny"))
    items = load_manifest(shapesworld_manifest)
    results = run_accuracy(model, items, ["none", "avgpool:factor=2"])
    summary = summarise(results)
    assert set(summary) == {"none", "avgpool:factor=2"}
    for entry in summary.values():
        assert entry["questions"] == len(items)
        assert sum(t["total"] for t in entry["per_type"].values()) == len(items)
        assert 0 < entry["chance"] < 1
    assert summary["none"]["prefill_ratio_to_none"] == 1.0
    assert summary["avgpool:factor=2"]["visual_tokens_kept"] == summary["none"]["visual_tokens_kept"] / 4
    table = markdown_table(summary)
    assert "`avgpool:factor=2`" in table and "chance" in table


def test_bench_accuracy_command_writes_json_and_markdown(shapesworld_manifest, tmp_path, capsys):
    folder = tmp_path / "model"
    VLM.from_config(VLMConfig.from_name("vidsieve-tiny")).save_pretrained(folder)
    out, markdown = tmp_path / "r.json", tmp_path / "r.md"
    code = main(["bench", "accuracy", "--manifest", str(shapesworld_manifest), "--model", str(folder),
                 "--compressor", "none", "--compressor", "random:ratio=0.5", "--limit", "4",
                 "--max-new-tokens", "2", "--out", str(out), "--markdown", str(markdown)])
    assert code == 0
    written = json.loads(out.read_text())
    assert set(written["results"]) == {"none", "random:ratio=0.5"}
    assert written["results"]["none"]["questions"] == 4
    assert "`random:ratio=0.5`" in markdown.read_text()


def test_kv_and_patch_reuse_give_the_same_accuracy_as_recomputing(shapesworld_manifest):
    from vlm.reuse import ReuseSpec

    model = VLM.from_config(VLMConfig.from_name("vidsieve-tiny"))
    items = load_manifest(shapesworld_manifest)[:6]
    specs = ["none", "random:ratio=0.5", "fastv:ratio=0.5"]
    plain = summarise(run_accuracy(model, items, specs, max_new_tokens=3))
    model.counters.clear()
    reused = summarise(run_accuracy(model, items, specs, max_new_tokens=3,
                                    reuse=ReuseSpec(kv=True, patches=True, threshold=0.0)))
    videos = len({item.video for item in items})
    assert model.counters["video_prefills"] == 2 * videos  # none and random; fastv needs the question
    assert set(reused) == set(plain) and len(plain) == 3
    for spec in plain:
        assert reused[spec]["per_type"] == plain[spec]["per_type"]


def test_each_video_is_compressed_with_its_own_seed_on_every_path(shapesworld_manifest):
    """`random` draws another subset in every clip (one seed for all would score one mask),
    the same one on a rerun, with and without reused KV."""
    from vlm.reuse import ReuseSpec

    model = VLM.from_config(VLMConfig.from_name("vidsieve-tiny"))
    items = load_manifest(shapesworld_manifest)  # 3 clips
    seen: dict = {"prefill": [], "answer": []}
    prefill, answer = model.prefill_video, model.answer_tokens
    model.prefill_video = lambda tokens, spec="none", *, seed=0: seen["prefill"].append(seed) or prefill(tokens, spec, seed=seed)
    model.answer_tokens = lambda tokens, q, spec, sampling, timings: (seen["answer"].append(sampling.seed)
                                                                      or answer(tokens, q, spec, sampling, timings))
    run_accuracy(model, items, ["random:ratio=0.5"], max_new_tokens=1, reuse=ReuseSpec(kv=True))
    run_accuracy(model, items, ["random:ratio=0.5"], max_new_tokens=1)
    videos = list(dict.fromkeys(item.video for item in items))
    assert len(videos) >= 2 and len({clip_seed(video) for video in videos}) == len(videos)
    assert seen["prefill"] == [clip_seed(video) for video in videos]
    assert seen["answer"] == [clip_seed(item.video) for item in items]
    assert clip_seed(videos[0]) == clip_seed(Path("elsewhere") / videos[0].name)  # the name, not the folder
