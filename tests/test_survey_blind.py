"""The survey is blind: a participant who reads everything but the pixels (headers, lengths, URLs, HTML, the
timing of image responses) does no better than chance, and the question order cannot be reproduced from the
public seed and the participant number. Both attacks succeeded against the server as it was before."""

from __future__ import annotations

import math
import random
import re
import time

import pytest
from starlette.testclient import TestClient

from pipeline.survey.app import create_app, load_versions
from pipeline.survey.store import SurveyStore
from tests.test_survey_app import ITEM, SHOWN, client, image_root, store  # noqa: F401  (fixtures)

PARTICIPANTS = 8  # × 50 questions: 400 answers, 80 of them unperturbed


def _seen(resp, seconds: float) -> dict:
    """What a participant's browser exposes about an image response besides its pixels."""
    h = {k.lower(): v for k, v in resp.headers.items() if k.lower() != "date"}
    return {"headers": tuple(sorted(h.items())), "length": len(resp.content), "seconds": seconds}


def _get(c, url):
    t0 = time.perf_counter()
    r = c.get(url)
    return _seen(r, time.perf_counter() - t0)


def _cheater_sessions(app, n_participants: int) -> list[tuple[dict, list[tuple[int, dict]]]]:
    """Each participant fetches the two example pairs (labelled by the survey itself) and answers every
    question; returns, per participant, the examples seen and (truth, what was seen) per question."""
    from pipeline.survey.app import COOKIE

    out = []
    for _ in range(n_participants):
        with TestClient(app, follow_redirects=False) as c:
            assert c.post("/start", data={}).status_code == 303
            pid = app.store.participant(c.cookies.get(COOKIE)).id
            examples = {(n, w): _get(c, f"/example-image/{n}/{w}") for n in (1, 2) for w in ("clean", "perturbed")}
            seen = []
            while True:
                page = c.get("/question")
                if page.status_code != 200:
                    break
                pos = int(ITEM.search(page.text).group(1))
                item, _, _ = app.store.current_item(pid)
                seen.append((int(item.eps_255 > 0), _get(c, f"/image/{pos}")))
                c.post("/answer", data={"item": str(pos), "answer": "unperturbed",
                                        "shown": SHOWN.search(page.text).group(1)})
            out.append((examples, seen))
    return out


def _rules(examples: dict) -> dict:
    """Ways to guess "perturbed" from everything but the pixels, calibrated on the survey's example pairs."""
    clean = [examples[(n, "clean")] for n in (1, 2)]
    pert = [examples[(n, "perturbed")] for n in (1, 2)]
    mid = (sum(e["length"] for e in clean) / 2 + sum(e["length"] for e in pert) / 2) / 2
    slow = 2 * max(e["seconds"] for e in clean + pert) + 0.05
    return {
        "headers": lambda s: s["headers"] != clean[0]["headers"],
        "length": lambda s: s["length"] > mid,  # perturbed PNGs compress worse
        "timing": lambda s: s["seconds"] > slow,
    }


def test_a_participant_reading_everything_but_the_pixels_does_no_better_than_chance(image_root, tmp_path):  # noqa: F811
    store = SurveyStore(tmp_path / "r.sqlite")
    app = create_app(load_versions(image_root), store, images_per_participant=10)
    sessions = _cheater_sessions(app, PARTICIPANTS)
    store.close()
    n = sum(len(seen) for _, seen in sessions)
    assert n == PARTICIPANTS * 50
    for name in ("headers", "length", "timing"):
        pos, neg = [], []
        for examples, seen in sessions:
            rule = _rules(examples)[name]
            for truth, s in seen:
                (pos if truth else neg).append(int(rule(s)))
        hit, false_alarm = sum(pos) / len(pos), sum(neg) / len(neg)
        balanced = (hit + 1 - false_alarm) / 2  # 0.5 for any guess that ignores the truth
        # binomial bound: chance plus 3.3 standard errors (one-sided 99.95 %)
        bound = 0.5 + 3.3 * math.sqrt(0.25 / len(pos) + 0.25 / len(neg)) / 2
        assert balanced <= bound, (name, balanced, bound, hit, false_alarm)


def test_every_image_of_a_set_has_the_same_bytes_length_and_headers(image_root, tmp_path):  # noqa: F811
    store = SurveyStore(tmp_path / "r.sqlite")
    app = create_app(load_versions(image_root), store, images_per_participant=10)
    with TestClient(app, follow_redirects=False) as c:
        c.post("/start", data={})
        lengths, header_sets = set(), set()
        for url in ("/example-image/1/clean", "/example-image/1/perturbed", "/example-image/2/clean",
                    "/example-image/2/perturbed"):
            r = c.get(url)
            lengths.add(len(r.content))
            header_sets.add(tuple(sorted((k.lower(), v) for k, v in r.headers.items())))
            assert r.headers["cache-control"] == "no-store"
            assert "last-modified" not in r.headers and "etag" not in r.headers
        assert len(lengths) == 1 and len(header_sets) == 1
    store.close()


def _old_order(seed: int, pid: int, pool_size: int, n_images: int, levels: list[int]) -> list[int]:
    """The ε of every question as the server drew it before: random.Random(f"{seed}:participant:{pid}"), one
    draw per pool image to choose them, then a shuffle of (image, ε) rows."""
    rng = random.Random(f"{seed}:participant:{pid}")
    for _ in range(pool_size):
        rng.random()
    rows = [k for _ in range(n_images) for k in levels]
    rng.shuffle(rows)
    return rows


def test_the_question_order_cannot_be_reproduced_from_the_public_seed(image_root, tmp_path):  # noqa: F811
    versions = load_versions(image_root)
    store = SurveyStore(tmp_path / "r.sqlite", seed=0)
    pools = {name: v.pool for name, v in versions.items()}
    agree, total = 0, 0
    for _ in range(20):
        _, p = store.join(pools, 10)
        with store.engine.connect() as conn:
            from pipeline.survey.store import items

            got = [r.eps_255 for r in conn.execute(items.select().where(items.c.participant_id == p.id)
                                                    .order_by(items.c.position))]
        levels = sorted(set(got))
        predicted = _old_order(0, p.id, len(pools[p.version]), 10, levels)
        agree += sum(a == b for a, b in zip(predicted, got))
        total += len(got)
    store.close()
    # chance: each position matches with probability 1/5 (five levels, equally many)
    assert agree / total < 0.2 + 3.3 * math.sqrt(0.2 * 0.8 / total), agree / total


def test_the_draw_key_lives_in_the_database_and_is_the_same_for_every_process(tmp_path):
    a = SurveyStore(tmp_path / "r.sqlite")
    b = SurveyStore(tmp_path / "r.sqlite")
    c = SurveyStore(tmp_path / "other.sqlite")
    assert a.draw_key == b.draw_key != c.draw_key and len(a.draw_key) == 32
    for s in (a, b, c):
        s.close()


def test_completion_codes_avoid_look_alikes(tmp_path, image_root):  # noqa: F811
    from pipeline.survey.store import CODE_ALPHABET

    store = SurveyStore(tmp_path / "r.sqlite")
    pools = {name: v.pool for name, v in load_versions(image_root).items()}
    codes = [store.join(pools, 10)[1].completion_code for _ in range(30)]
    store.close()
    assert all(re.fullmatch(f"[{CODE_ALPHABET}]{{10}}", c) for c in codes)
    assert not set("".join(codes)) & set("O0I1")


def test_the_browser_measured_response_time_is_stored_beside_the_servers(client, store):
    from tests.test_survey_app import _join

    _join(client)
    page = client.get("/question")
    assert 'src="/timer.js"' in page.text and 'name="client_ms"' in page.text
    assert "performance.now()" in client.get("/timer.js").text
    pos = int(ITEM.search(page.text).group(1))
    r = client.post("/answer", data={"item": str(pos), "answer": "perturbed", "client_ms": "1234",
                                     "shown": SHOWN.search(page.text).group(1)})
    assert r.status_code == 303
    row = next(store.export_rows())
    assert row["client_ms"] == 1234 and row["response_ms"] != ""
