"""Metrics: Frechet distance on streamed features, CLIP score, the Inception loader, and the exact judge."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch

from ldm.io.manifest import StageError
from ldm.metrics.frechet import FeatureStats, clip_score, frechet_distance
from tests.helpers import make_config


def _independent_fd(a: np.ndarray, b: np.ndarray) -> float:
    """FD from all features at once (np.cov, a symmetric square root via eigh): no shared code path."""
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(s1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    # Tr sqrt(S1 S2) = Tr sqrt(R1 S2 R1) with R1 = S1^(1/2), a symmetric PSD matrix.
    m = root1 @ s2 @ root1
    tr = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr)


def test_streamed_frechet_matches_an_independent_computation():
    """Features fed in uneven batches give the FD of all features at once, to 1e-6 relative.

    Bugs caught: a biased (1/n) covariance, float32 running sums losing precision, a batch dropped or
    counted twice, the sqrt term's sign or factor 2 wrong.
    """
    rng = np.random.default_rng(0)
    a = rng.standard_normal((1000, 24)) @ rng.standard_normal((24, 24)) + 3.0
    b = rng.standard_normal((900, 24)) * 1.5 + 2.5
    sa, sb = FeatureStats(24), FeatureStats(24)
    for i in range(0, 1000, 137):
        sa.update(torch.from_numpy(a[i : i + 137]))
    for i in range(0, 900, 250):
        sb.update(b[i : i + 250])
    assert sa.n == 1000 and sb.n == 900
    got = frechet_distance(*sa.mean_cov(), *sb.mean_cov())
    want = _independent_fd(a, b)
    assert got == pytest.approx(want, rel=1e-6)
    assert frechet_distance(*sa.mean_cov(), *sa.mean_cov()) == pytest.approx(0.0, abs=1e-6)


def test_frechet_agrees_with_torchmetrics():
    """torchmetrics' FrechetInceptionDistance on the same features through an identity feature module.

    Bugs caught: a convention that differs from the maintained implementation (e.g. unbiased vs biased cov).
    """
    from torchmetrics.image.fid import FrechetInceptionDistance

    class Identity(torch.nn.Module):
        num_features = 8

        def forward(self, x):
            return x

    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(400, 8, generator=g), torch.randn(400, 8, generator=g) * 1.3 + 0.2
    tm = FrechetInceptionDistance(feature=Identity())
    tm.update(a, real=True)
    tm.update(b, real=False)
    sa, sb = FeatureStats(8), FeatureStats(8)
    sa.update(a)
    sb.update(b)
    assert frechet_distance(*sa.mean_cov(), *sb.mean_cov()) == pytest.approx(float(tm.compute()), rel=1e-4)


def test_singular_covariances_take_the_eps_offset():
    """Fewer samples than dimensions: sqrtm of a singular product stays finite (eps*I retry), imaginary part dropped.

    Bugs caught: NaN or complex FDs on small sample counts.
    """
    rng = np.random.default_rng(2)
    sa, sb = FeatureStats(64), FeatureStats(64)
    sa.update(rng.standard_normal((10, 64)))
    sb.update(rng.standard_normal((10, 64)))
    fd = frechet_distance(*sa.mean_cov(), *sb.mean_cov())
    assert isinstance(fd, float) and np.isfinite(fd) and fd > 0
    assert np.isrealobj(scipy.linalg.sqrtm(np.eye(3)))


def test_clip_score_on_known_vectors():
    """cos 1 -> 100, cos 0.6 -> 60, opposite vectors clamp to 0; the mean is over pairs; scale does not matter.

    Bugs caught: a missing max(cos, 0), a missing factor 100, unnormalised dot products.
    """
    img = torch.tensor([[1.0, 0.0], [3.0, 4.0], [-1.0, 0.0]])
    txt = torch.tensor([[2.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    assert clip_score(img, txt) == pytest.approx((100 + 60 + 0) / 3)


def test_missing_inception_weights_is_one_line(tmp_path):
    """extractor inception without its file: refused at config load or with a StageError naming the file.

    Bugs caught: a silent download (torchvision's default weights), a traceback instead of a line.
    """
    from ldm.config import ConfigError
    from ldm.metrics.features import check_extractor

    with pytest.raises(ConfigError, match="evaluate.inception_weights"):
        make_config(tmp_path, "evaluate.extractor=inception")
    cfg = make_config(tmp_path, "evaluate.extractor=inception", f"evaluate.inception_weights={tmp_path}/pt_inc.pth")
    with pytest.raises(StageError, match="pt_inc.pth do not exist") as info:
        check_extractor(cfg)
    assert "\n" not in str(info.value)


def test_inception_loader_reads_a_state_dict_in_the_fid_layout(tmp_path):
    """A random InceptionV3 state dict with the FID weights' 1008 classes loads, and gives 2048-d pool3 features.

    Bugs caught: keys that do not match the FID file's layout (AuxLogits expected), the classifier's
    logits returned instead of pool3, a hash that does not name the file's content.
    """
    from torchvision.models import Inception3

    from ldm.metrics.features import make_extractor
    from ldm.stage import content_id

    net = Inception3(num_classes=1008, aux_logits=False, init_weights=False)
    path = tmp_path / "pt_inception.pth"
    torch.save(net.state_dict(), path)
    cfg = make_config(tmp_path, "evaluate.extractor=inception", f"evaluate.inception_weights={path}")
    ex = make_extractor(cfg)
    feats = ex(np.zeros((2, 32, 32, 3), np.uint8))
    assert ex.name == "inception" and feats.shape == (2, 2048) and ex.weights_hash == content_id(str(path))


@pytest.fixture(scope="module")
def judge_data():
    """A judge trained on 2,500 renders at 32 px, and 400 held-out renders with labels."""
    from ldm.metrics import judge as J
    from ldm.synthetic import HELDOUT_START

    x, y = J.render_labelled(1, range(J.JUDGE_START, J.JUDGE_START + 2500), 48, 32)
    xt, yt = J.render_labelled(1, range(HELDOUT_START, HELDOUT_START + 400), 48, 32)
    return J, x, y, xt, yt


def test_judge_reads_real_renders_and_shuffled_labels_do_not(judge_data):
    """The judge scores held-out renders well above chance; trained on shuffled labels it stays near chance.

    Bugs caught: labels misaligned with images (wrong canonical order, index off by one) give a judge
    near chance; an evaluation that leaks training images would let the shuffled judge score high.
    """
    J, x, y, xt, yt = judge_data
    torch.set_num_threads(2)
    acc = J.accuracy(J.predict(J.train_judge(x, y, 5, 0), xt), yt)
    assert acc["colour"] >= 0.85 and acc["position"] >= 0.9 and acc["background"] >= 0.9, acc
    rng = np.random.default_rng(0)
    perm = rng.permutation(len(x))
    shuffled = {k: v[perm] for k, v in y.items()}
    bad = J.accuracy(J.predict(J.train_judge(x, shuffled, 2, 0), xt), yt)
    assert bad["colour"] < 0.3 and bad["background"] < 0.35, bad  # chance: 1/8 and 1/7


def test_judge_labels_are_canonical():
    """ "A left of B" and "B right of A" get the same labels; a single object gets its named position.

    Bugs caught: relation labels that depend on caption order (the image cannot tell them apart).
    """
    import dataclasses

    from ldm.metrics.judge import IGNORE, labels
    from ldm.synthetic import describe

    for i in range(200):
        s = describe(0, i, 64)
        lab = labels(s)
        if len(s.objects) == 2:
            flipped = labels(dataclasses.replace(s, objects=s.objects[::-1]))
            assert flipped == lab and lab["position"] == IGNORE and lab["axis"] in (0, 1)
        else:
            assert lab["colour_b"] == IGNORE and 0 <= lab["position"] < 5


def test_judge_scores_position_and_background_only_where_the_prompt_names_them():
    """A caption that names no position (or background) leaves that label out of the accuracy; a pair's
    relation always counts; colour and shape always count.

    Bugs caught: grading a generated image's position against a prompt that never asked for one (a coin
    toss that drags the position accuracy toward chance whatever the model does).
    """
    from ldm.metrics.judge import IGNORE, labels, prompted
    from ldm.synthetic import POSITIONS, describe

    seen = set()
    for i in range(300):
        s = describe(0, i, 64)
        full, scored = labels(s), prompted(s)
        named_pos = any(p in s.caption for p in POSITIONS)
        named_bg = s.background in s.caption
        if len(s.objects) == 1:
            assert (scored["position"] == full["position"]) == named_pos
            assert (scored["position"] == IGNORE) == (not named_pos)
            seen.add(("pos", named_pos))
        else:
            assert scored["axis"] == full["axis"] != IGNORE
        assert (scored["background"] == IGNORE) == (not named_bg)
        seen.add(("bg", named_bg))
        assert {k: scored[k] for k in ("colour_a", "shape_a", "colour_b", "shape_b")} == {
            k: full[k] for k in ("colour_a", "shape_a", "colour_b", "shape_b")
        }
    assert seen == {("pos", True), ("pos", False), ("bg", True), ("bg", False)}


def test_judge_renders_only_scenes_rated_at_least_the_floor():
    """With min_rating the judge's renders are the scenes rated >= it, in index order, up to `limit`.

    Bugs caught: a judge trained on the whole world's degraded renders (at 64 px it then read held-out
    shapes at 0.45 instead of 0.69); a limit that is ignored or off by one.
    """
    from ldm.metrics.judge import render_labelled
    from ldm.synthetic import describe

    indices = range(500, 700)
    rated = [i for i in indices if describe(3, i, 48).rating >= 6.0]
    assert 0 < len(rated) < len(indices)
    images, targets = render_labelled(3, indices, 48, 32, min_rating=6.0)
    assert len(images) == len(targets["shape_a"]) == len(rated)
    first, _ = render_labelled(3, rated[:1], 48, 32)
    assert np.array_equal(images[0], first[0])
    limited, _ = render_labelled(3, indices, 48, 32, min_rating=6.0, limit=7)
    assert len(limited) == 7 and np.array_equal(limited, images[:7])


def test_judge_matches_a_pairs_objects_before_scoring_colour_shape_and_relation():
    """A pair drawn with its objects swapped keeps its colours and shapes and loses its relation, as in
    GenEval; a pair whose objects the judge cannot tell apart gets no relation credit.

    Bugs caught: scoring a pair's objects in prompt order only (a swapped pair read as every colour and
    shape wrong); a matching that ignores order and so credits the relation of a swapped pair; a tie
    resolved in the prompt's favour.
    """
    from ldm.metrics.judge import HEADS, IGNORE, accuracy

    # Prompt: a pair (red=0 circle=0 left of blue=2 square=1) and a single object (green=1 star=3, centre).
    targets = {k: np.array([IGNORE, IGNORE]) for k in HEADS}
    targets.update(count=np.array([1, 0]), colour_a=np.array([0, 1]), shape_a=np.array([0, 3]),
                   colour_b=np.array([2, IGNORE]), shape_b=np.array([1, IGNORE]), axis=np.array([0, IGNORE]),
                   position=np.array([IGNORE, 0]))  # fmt: skip

    def read(ca, sa, cb, sb, axis=0):
        return {**{k: np.array([0, 0]) for k in HEADS}, "colour_a": np.array([ca, 1]), "shape_a": np.array([sa, 3]),
                "colour_b": np.array([cb, 5]), "shape_b": np.array([sb, 6]), "axis": np.array([axis, 1])}  # fmt: skip

    right = accuracy(read(0, 0, 2, 1), targets)
    assert right["colour"] == right["shape"] == right["position"] == 1.0, right
    swapped = accuracy(read(2, 1, 0, 0), targets)
    assert swapped["colour"] == swapped["shape"] == 1.0 and swapped["position"] == 0.5, swapped
    wrong_axis = accuracy(read(0, 0, 2, 1, axis=1), targets)
    assert wrong_axis["position"] == 0.5, wrong_axis
    # The judge reads the first object's colour right and the second's shape as the first's: one attribute
    # agrees either way, so nothing identifies the objects and the relation is not credited.
    tie = accuracy(read(0, 5, 7, 0), targets)
    assert tie["position"] == 0.5 and tie["colour"] == 2 / 3 and tie["shape"] == 1 / 3, tie


def test_prompt_set_draws_rated_scenes_whose_pictures_show_their_captions(tmp_path):
    """The held-out prompts are scenes rated >= the filter's floor, less bad_crop scenes, whose object the
    crop moves off the position its caption names or out of the frame.

    Bugs caught: prompts whose own render fails them (one in six rated >= 6 was cropped, and the judge's
    ceiling on real renders read shape 0.83 instead of 0.93); a floor that is not applied.
    """
    from ldm.evaluate.data import prompt_set
    from ldm.synthetic import HELDOUT_START, describe

    cfg = make_config(tmp_path, "filter.aesthetic_min=6.0", "evaluate.prompt_count=300")
    ps = prompt_set(cfg)
    assert len(ps.specs) == 300 and all(s.rating >= 6.0 and "bad_crop" not in s.degradations for s in ps.specs)
    assert [s.caption for s in ps.specs] == ps.prompts and ps.origin["without"] == "bad_crop"
    # The floor lets cropped scenes through: without the exclusion about one prompt in six would be one.
    nearby = [describe(cfg.source.seed, HELDOUT_START + i, cfg.source.image_size) for i in range(2000)]
    rated = [s for s in nearby if s.rating >= 6.0]
    assert sum("bad_crop" in s.degradations for s in rated) > len(rated) / 10
