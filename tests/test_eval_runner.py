"""End-to-end evaluation runs on small models, and sharding across two gloo processes."""

import os
import tempfile

import _models as M
import pytest
import torch
import torch.multiprocessing as mp

import transformer_lrp as tl
from transformer_lrp.evaluation import data, report, runner


def _image_case():
    # float64, so that a sample's map does not depend on which batch it is explained in, even at rounding level
    model = M.timm_vit(torch.float64, num_classes=10)
    bench = data.fashion_canvases(10, seed=0, size=32, object_size=(12, 20))
    return model, (lambda x: ((x - 0.5) / 0.25).double()), bench


def test_image_evaluation_end_to_end(tmp_path):
    model, normalize, bench = _image_case()
    res = runner.evaluate_images(model, normalize, bench, tl.METHODS, batch_size=4, progress=False)
    assert set(res) == {"model", *tl.METHODS}
    assert res["model"]["samples"] == 10
    for method in tl.METHODS:
        for key in ("negative_predicted_auc", "positive_predicted_auc", "negative_target_auc", "positive_target_auc"):
            assert 0.0 <= res[method][key] <= 90.0
        for key in ("pixel_acc", "miou", "map", "fg_iou", "fg_ap"):
            assert 0.0 <= res[method][key] <= 100.0
    # class-agnostic maps score the same whichever class is "explained"
    assert res["rollout"]["negative_predicted_auc"] == res["rollout"]["negative_target_auc"]
    report.write_results(tmp_path / "r", [("images", "image", res)], "# test")
    assert "| transformer_attribution |" in (tmp_path / "r.md").read_text()
    # header + model accuracy and sample count + 9 metrics per method
    assert len((tmp_path / "r.csv").read_text().splitlines()) == 1 + 2 + 9 * len(tl.METHODS)


def test_image_evaluation_ranks_the_rule_sets_by_patch():
    """AttnLRP and CP-LRP are scored on their patch maps (the unit their relevance is defined on), full LRP on its
    pixels: the segmentation scores equal those recomputed from the chosen maps and differ from the other choice."""
    from transformer_lrp.evaluation import metrics

    model, normalize, bench = _image_case()
    methods = ("attnlrp", "cp_lrp", "full_lrp")
    res = runner.evaluate_images(model, normalize, bench, methods, batch_size=10, progress=False)
    inputs = normalize(bench.images)
    predicted = model(inputs).argmax(-1)
    for method in methods:
        exp = tl.explain(model, inputs, predicted, method=method)
        chosen = metrics.segmentation_scores(metrics.segmentation_sums(exp.image_maps(pixels=method == "full_lrp"),
                                                                       bench.masks))
        other = metrics.segmentation_scores(metrics.segmentation_sums(exp.image_maps(pixels=method != "full_lrp"),
                                                                      bench.masks))
        assert res[method]["miou"] == pytest.approx(chosen["miou"], abs=1e-9), method
        assert res[method]["map"] == pytest.approx(chosen["map"], abs=1e-9), method
        assert abs(chosen["map"] - other["map"]) > 1e-6, method


def _tiny_text_model(texts):
    from transformers import BertTokenizerFast

    words = sorted({w for t in texts for w in t.lower().split()})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
    path = os.path.join(tempfile.mkdtemp(), "vocab.txt")
    with open(path, "w") as f:
        f.write("\n".join(vocab))
    tok = BertTokenizerFast(vocab_file=path, do_lower_case=True)
    model = M.hf_bert(torch.float32, vocab_size=len(vocab), num_labels=2, max_position_embeddings=64)
    return model, tok


def test_text_evaluations_end_to_end():
    texts = ["a truly wonderful film", "dull and boring plot here", "the cast was great fun", "an awful mess"]
    bench = data.TextBenchmark(texts, torch.tensor([1, 0, 1, 0]), [[2], [0, 2], [3, 4], [1]])
    model, tok = _tiny_text_model(texts)
    res = runner.evaluate_text_perturbation(model, tok, bench, tl.METHODS, batch_size=3, progress=False)
    assert all(0 <= res[m]["negative_target_auc"] <= 90 for m in tl.METHODS)
    f1 = runner.evaluate_rationales(model, tok, bench, tl.METHODS, ks=(1, 2), batch_size=3, progress=False)
    for m in tl.METHODS:
        assert set(f1[m]) == {"top1_micro_f1", "top1_macro_f1", "top2_micro_f1", "top2_macro_f1",
                              "oracle_k_micro_f1", "oracle_k_macro_f1"}
        assert all(0 <= v <= 100 for v in f1[m].values())


def _shard_worker(rank, world, init_file, out_file):
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    model, normalize, bench = _image_case()
    res = runner.evaluate_images(model, normalize, bench, ("gae", "raw_attention"), batch_size=1, progress=False)
    if rank == 0:
        torch.save(res, out_file)
    torch.distributed.destroy_process_group()


def test_two_gloo_processes_give_the_single_process_result(tmp_path):
    out = tmp_path / "sharded.pt"
    mp.spawn(_shard_worker, args=(2, str(tmp_path / "init"), str(out)), nprocs=2, join=True)
    sharded = torch.load(out)
    model, normalize, bench = _image_case()
    # batch size 1 on both sides: each sample's map is then bitwise the same (AP groups exactly tied scores, so
    # a last-bit difference from another batch composition could move it)
    # and one thread on both sides, as each worker: torch's CPU flash-attention forward may block its work by the
    # thread count, which moves last bits
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = runner.evaluate_images(model, normalize, bench, ("gae", "raw_attention"), batch_size=1,
                                        progress=False)
    finally:
        torch.set_num_threads(threads)
    assert sharded.keys() == single.keys()
    for key in single:
        assert sharded[key] == pytest.approx(single[key], rel=1e-9, abs=1e-9)
