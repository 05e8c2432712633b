"""The survey web app: the protocol through an HTTP client, a real browser, and many participants at once."""

from __future__ import annotations

import http.client
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import quote

import pytest
import torch
import yaml
from starlette.testclient import TestClient

from pipeline.core.errors import DatasetError
from pipeline.data import load_dataset
from pipeline.models import build_model, load_checkpoint, save_checkpoint
from pipeline.survey.app import COOKIE, create_app, load_versions
from pipeline.survey.store import SurveyStore

EPS = [4 / 255, 8 / 255, 16 / 255, 32 / 255]
N_QUESTIONS = 10 * 5
ITEM = re.compile(r'name="item" value="(\d+)"')
SHOWN = re.compile(r'name="shown" value="([^"]+)"')
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


def tiny_checkpoint(path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    save_checkpoint(path, build_model("smallcnn", 10), {"arch": "smallcnn", "num_classes": 10, "mean": [0.0] * 3,
                                                        "std": [1.0] * 3, "role": "teacher", "dataset": "digits"})
    return path


@pytest.fixture(scope="module")
def image_root(tmp_path_factory, digits_root):
    """Two survey versions (two untrained models) of 20 pool images each, at 0 and four budgets."""
    from pipeline.survey.images import build_image_set

    root = tmp_path_factory.mktemp("survey")
    ds = load_dataset("digits", str(digits_root), "test", 16)
    for seed, version in enumerate(("teacher", "student")):
        model, meta = load_checkpoint(tiny_checkpoint(root / f"{version}.pt", seed=seed))
        build_image_set(model, meta, ds, root / "images" / version, version=version, eps_list=EPS, per_class=2,
                        attack="pgd", steps=2, seed=0, batch_size=256, device=torch.device("cpu"), progress=False)
    return root / "images"


@pytest.fixture
def store(tmp_path):
    s = SurveyStore(tmp_path / "responses.sqlite")
    yield s
    s.close()


@pytest.fixture
def client(image_root, store):
    app = create_app(load_versions(image_root), store, images_per_participant=10)
    with TestClient(app, follow_redirects=False) as c:
        yield c


def _join(c: TestClient, external: str | None = None) -> None:
    r = c.post("/start", data={"external_id": external} if external else {})
    assert r.status_code == 303 and r.headers["location"] == "/example/1", r.text
    assert COOKIE in c.cookies


def _answer_current(c: TestClient, answer: str) -> int:
    page = c.get("/question")
    assert page.status_code == 200, page.text
    pos = int(ITEM.search(page.text).group(1))
    assert c.get(f"/image/{pos}").status_code == 200
    r = c.post("/answer", data={"item": str(pos), "answer": answer, "shown": SHOWN.search(page.text).group(1)})
    assert r.status_code == 303 and r.headers["location"] == "/question", r.text
    return pos


def _message(r) -> str:
    m = re.search(r'<p id="message">(.*?)</p>', r.text, re.S)
    return m.group(1).strip() if m else ""


def test_protocol_end_to_end_and_export(client, store):
    welcome = client.get("/?PROLIFIC_PID=p-01")
    assert welcome.status_code == 200 and "50 images" in welcome.text and 'value="p-01"' in welcome.text
    _join(client, "p-01")
    for n in (1, 2):
        page = client.get(f"/example/{n}")
        assert page.status_code == 200 and f"Example {n} of 2" in page.text
        for which in ("clean", "perturbed"):
            img = client.get(f"/example-image/{n}/{which}")
            assert img.status_code == 200 and img.content[:8] == b"\x89PNG\r\n\x1a\n"
    given = {}
    for i in range(1, N_QUESTIONS + 1):
        page = client.get("/question")
        assert f"Question {i} of {N_QUESTIONS}" in page.text and f'aria-valuenow="{i - 1}"' in page.text
        assert ".png" not in page.text and "eps" not in page.text.lower()  # nothing on the page tells the budget
        given[_answer_current(client, "perturbed" if i % 2 else "unperturbed")] = i
    assert client.get("/question").headers["location"] == "/done"
    done = client.get("/done")
    code = re.search(r'id="completion-code">(\w+)<', done.text).group(1)
    rows = list(store.export_rows())
    assert len(rows) == N_QUESTIONS and sorted(r["position"] for r in rows) == list(range(1, N_QUESTIONS + 1))
    assert {r["external_id"] for r in rows} == {"p-01"} and all(r["completed"] == 1 for r in rows)
    assert [r["answer"] for r in rows] == ["perturbed" if given[p] % 2 else "unperturbed" for p in range(1, 51)]
    # the balanced draw: 10 distinct pool images, each unperturbed and at every budget
    per_image = {}
    for r in rows:
        per_image.setdefault(r["pool_index"], []).append(r["eps_255"])
    assert len(per_image) == 10 and all(sorted(v) == [0, 4, 8, 16, 32] for v in per_image.values())
    assert [r["eps_255"] for r in rows] != sorted(r["eps_255"] for r in rows)  # shuffled
    assert all(r["response_ms"] != "" for r in rows)
    assert store.participant(client.cookies[COOKIE]).completion_code == code


def test_reload_resumes_and_answers_are_final(client, store, image_root):
    _join(client)
    first = [_answer_current(client, "perturbed") for _ in range(3)]
    assert first == [1, 2, 3]
    # a new browser tab / reload with the same cookie continues at question 4
    again = TestClient(client.app, follow_redirects=False, cookies={COOKIE: client.cookies[COOKIE]})
    assert "Welcome back" in again.get("/").text and 'href="/question"' in again.get("/").text
    assert "Question 4 of 50" in again.get("/question").text
    assert again.post("/start").headers["location"] == "/question"  # starting again resumes, no new participant
    # a forged "shown" stamp is not an error, it only loses the response time
    page = again.get("/question").text
    forged = SHOWN.search(page).group(1).replace("|", "0|", 1)
    assert again.post("/answer", data={"item": "4", "answer": "unperturbed", "shown": forged}).status_code == 303
    # the same answer sent twice (double click, resubmission) is stored once
    assert again.post("/answer", data={"item": "3", "answer": "perturbed"}).status_code == 303
    # a different answer to an answered item is refused, and the first one stays
    r = again.post("/answer", data={"item": "2", "answer": "unperturbed"})
    assert r.status_code == 409 and "already been answered" in _message(r)
    # items must be answered in order, and only items of one's own survey
    r = again.post("/answer", data={"item": "9", "answer": "perturbed"})
    assert r.status_code == 409 and "not your current question" in _message(r)
    r = again.post("/answer", data={"item": "51", "answer": "perturbed"})
    assert r.status_code == 404 and "no question 51" in _message(r)
    assert again.get("/image/9").status_code == 404  # future images are not served either
    assert again.get("/done").headers["location"] == "/question"
    rows = list(store.export_rows())
    assert [(r["position"], r["answer"]) for r in rows] == [(1, "perturbed"), (2, "perturbed"), (3, "perturbed"),
                                                           (4, "unperturbed")]
    assert [r["response_ms"] == "" for r in rows] == [False, False, False, True]
    assert store.counts()["participants"] == 1


def test_participants_are_isolated_and_balanced(image_root, store):
    app = create_app(load_versions(image_root), store, images_per_participant=10)
    clients = [TestClient(app, follow_redirects=False) for _ in range(8)]
    for c in clients:
        _join(c)
    a, b = clients[0], clients[1]
    _answer_current(a, "perturbed")
    # b sees its own first question, not a's progress, and cannot answer a's question 2 on a's behalf
    assert "Question 1 of 50" in b.get("/question").text
    assert b.post("/answer", data={"item": "2", "answer": "perturbed"}).status_code == 409
    assert "Question 2 of 50" in a.get("/question").text
    # no page of b shows a's completion code
    code_a = store.participant(a.cookies[COOKIE]).completion_code
    for path in ("/", "/question", "/example/1", "/done"):
        assert code_a not in b.get(path).text
    # versions alternate and pool images are spread evenly (20 per version, 4 participants x 10 each)
    parts = [store.participant(c.cookies[COOKIE]) for c in clients]
    assert sorted(p.version for p in parts) == ["student"] * 4 + ["teacher"] * 4
    import sqlalchemy as sa

    from pipeline.survey.store import items
    with store.engine.connect() as conn:
        shown = conn.execute(sa.select(items.c.version, items.c.pool_index, sa.func.count())
                             .where(items.c.eps_255 == 0).group_by(items.c.version, items.c.pool_index)).all()
    assert len(shown) == 40 and {n for _, _, n in shown} == {2}


def test_server_processes_on_one_database_share_the_timestamp_key(image_root, tmp_path):
    """A page served by one process and answered through another (or after a restart) keeps its response time."""
    db = tmp_path / "shared.sqlite"
    stores = [SurveyStore(db), SurveyStore(db)]
    try:
        a, b = (TestClient(create_app(load_versions(image_root), s, images_per_participant=10),
                           follow_redirects=False) for s in stores)
        _join(a)
        b.cookies.set(COOKIE, a.cookies[COOKIE])
        for answering in (b, a, b):
            page = a.get("/question").text
            pos, shown = ITEM.search(page).group(1), SHOWN.search(page).group(1)
            r = answering.post("/answer", data={"item": pos, "answer": "perturbed", "shown": shown})
            assert r.status_code == 303
        rows = list(stores[0].export_rows())
        assert len(rows) == 3 and all(r["response_ms"] != "" for r in rows)
        assert stores[0].signing_key == stores[1].signing_key == SurveyStore(db).signing_key
        assert SurveyStore(tmp_path / "other.sqlite").signing_key != stores[0].signing_key
    finally:
        for s in stores:
            s.close()


def test_servers_started_at_once_on_a_new_database_all_start(tmp_path):
    """Several servers opening one new SQLite file at the same moment queue for it instead of failing."""
    for trial in range(3):
        db = tmp_path / f"new{trial}.sqlite"
        start = threading.Barrier(6, timeout=60)

        def open_store(_):
            start.wait()
            s = SurveyStore(db)
            key = s.signing_key
            s.close()
            return key

        with ThreadPoolExecutor(max_workers=6) as pool:
            keys = list(pool.map(open_store, range(6)))  # re-raises "database is locked" if one failed
        assert len(set(keys)) == 1


def test_same_recruiting_id_cannot_start_twice(client, image_root):
    _join(client, "dup-7")
    other = TestClient(client.app, follow_redirects=False)
    r = other.post("/start", data={"external_id": "dup-7"})
    assert r.status_code == 409 and "already started" in _message(r)


MALFORMED = [
    ("post", "/answer", {"data": {"item": "1", "answer": "perturbed"}}, False, 403, "No survey session"),
    ("post", "/answer", {"json": {"item": 1, "answer": "perturbed"}}, True, 415, "x-www-form-urlencoded"),
    ("post", "/answer", {"content": b"item=1&answer=" + b"x" * 5000,
                         "headers": {"content-type": "application/x-www-form-urlencoded"}}, True, 413, "larger"),
    ("post", "/answer", {"content": b"item=1&answer=\xff\xfe",
                         "headers": {"content-type": "application/x-www-form-urlencoded"}}, True, 400, "UTF-8"),
    ("post", "/answer", {"data": {"item": "1", "answer": "perturbed", "x": "1"}}, True, 400, "Unexpected form field"),
    ("post", "/answer", {"content": b"item=1&item=2&answer=perturbed",
                         "headers": {"content-type": "application/x-www-form-urlencoded"}}, True, 400, "twice"),
    ("post", "/answer", {"data": {"item": "1", "answer": "maybe"}}, True, 400, "must be one of"),
    ("post", "/answer", {"data": {"item": "abc", "answer": "perturbed"}}, True, 400, "question number"),
    ("post", "/answer", {"data": {"item": "-1", "answer": "perturbed"}}, True, 400, "question number"),
    ("post", "/answer", {"data": {"item": "9" * 40, "answer": "perturbed"}}, True, 400, "question number"),
    ("post", "/answer", {"data": {"answer": "perturbed"}}, True, 400, "question number"),
    # only ASCII digits: '²' passes str.isdigit() but not int(), '٣' and '１' are other scripts' digits
    ("post", "/answer", {"data": {"item": "²", "answer": "perturbed"}}, True, 400, "question number"),
    ("post", "/answer", {"data": {"item": "٣", "answer": "perturbed"}}, True, 400, "question number"),
    ("post", "/answer", {"data": {"item": "１", "answer": "perturbed"}}, True, 400, "question number"),
    ("post", "/answer", {"data": {"item": "1\n", "answer": "perturbed"}}, True, 400, "question number"),
    ("post", "/answer", {"content": b"%%%", "headers": {"content-type": "application/x-www-form-urlencoded"}},
     True, 400, "Unexpected form field"),
    ("post", "/start", {"data": {"external_id": "<script>alert(1)</script>"}}, False, 400, "participant id"),
    ("post", "/start", {"data": {"external_id": "p-1\n"}}, False, 400, "participant id"),
    ("get", "/?PROLIFIC_PID=" + "a" * 100, {}, False, 400, "participant id"),
    ("get", "/image/1", {}, False, 403, "No survey session"),
    ("get", "/image/abc", {}, True, 404, "Not Found"),
    ("get", "/image/..%2F..%2Fset.json", {}, True, 404, "Not Found"),
    ("get", "/image/99999999999999999999999", {}, True, 404, "not your current question"),
    ("get", "/example/3", {}, True, 404, "two examples"),
    ("get", "/example-image/1/..%2Fmanifest.csv", {}, True, 404, "Not Found"),
    ("get", "/example-image/1/other", {}, True, 404, "No such example image"),
    ("get", "/example-image/1/clean", {}, False, 403, "No survey session"),
    ("put", "/answer", {}, True, 405, "not allowed"),
    ("get", "/nothing-here", {}, False, 404, "Not Found"),
]


@pytest.mark.parametrize("method,path,kwargs,joined,status,message", MALFORMED,
                         ids=[f"{m[0]} {m[1][:30]} {m[4]}" for m in MALFORMED])
def test_malformed_requests_get_a_4xx_with_a_message(client, method, path, kwargs, joined, status, message):
    if joined:
        _join(client)
    r = getattr(client, method)(path, **kwargs)
    assert r.status_code == status, r.text
    assert message.lower() in _message(r).lower(), _message(r)
    assert r.headers["content-type"].startswith("text/html")


def test_bogus_cookie_is_no_session(client):
    client.cookies.set(COOKIE, "x" * 5000)
    assert client.get("/question").headers["location"] == "/"
    assert client.post("/answer", data={"item": "1", "answer": "perturbed"}).status_code == 403


def test_image_sets_are_checked_before_serving(image_root, tmp_path):
    bad = tmp_path / "sets"
    shutil.copytree(image_root / "teacher", bad / "teacher")
    man = bad / "teacher" / "manifest.csv"
    text = man.read_text()
    line = next(ln for ln in text.splitlines() if ",pool," in ln and "_e004.png" in ln)
    fields = line.split(",")
    fields[9] = "5"  # linf_255 beyond its 4/255 ball
    man.write_text(text.replace(line, ",".join(fields)))
    with pytest.raises(DatasetError, match="outside its 4/255 ball"):
        load_versions(bad)
    fields[9], fields[0] = "4", "../../../../etc/passwd"
    man.write_text(text.replace(line, ",".join(fields)))
    with pytest.raises(DatasetError, match="not a file inside the image set"):
        load_versions(bad)
    with pytest.raises(DatasetError, match="no image set for version"):
        load_versions(image_root, ["nope"])
    with pytest.raises(DatasetError, match="each participant needs 30"):
        create_app(load_versions(image_root), SurveyStore(tmp_path / "db.sqlite"), images_per_participant=30)


# --------------------------------------------------------------------------------------- a real server


def test_keep_alive_connections_have_tcp_nodelay(image_root, store):
    """uvicorn on the socket `serve` listens on: every accepted connection sends without Nagle's delay."""
    import socket

    import uvicorn

    from pipeline.survey.app import listening_socket

    sock = listening_socket("127.0.0.1", 0)
    port = sock.getsockname()[1]
    app = create_app(load_versions(image_root), store, images_per_participant=10)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        for _ in range(200):
            if server.started:
                break
            time.sleep(0.05)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        for _ in range(2):  # the same keep-alive connection twice
            conn.request("GET", "/healthz")
            r = conn.getresponse()
            assert r.status == 200 and r.read() and r.getheader("connection") != "close"
        accepted = [c.transport.get_extra_info("socket") for c in server.server_state.connections]
        assert len(accepted) == 1
        assert accepted[0].getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
        conn.close()
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def server(image_root, tmp_path_factory):
    """`sipat survey serve` on 127.0.0.1, any free port; yields (base URL, database path).

    One server for the module's tests (each test reads back only its own participants).
    SIPAT_SURVEY_IMAGES serves another folder of image sets (e.g. the pipeline's, for a screenshot).
    """
    image_root = Path(os.environ.get("SIPAT_SURVEY_IMAGES", image_root))
    tmp_path = tmp_path_factory.mktemp("server")
    db = tmp_path / "responses.sqlite"
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"survey": {"images_per_participant": 10, "seed": 0}}))
    cmd = [sys.executable, "-m", "pipeline.cli", "survey", "serve", "--images", str(image_root), "--db", str(db),
           "--port", "0", "--params", str(params), "--no-access-log"]
    proc = subprocess.Popen(cmd, cwd=Path(__file__).resolve().parents[1], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=dict(os.environ, COLUMNS="200"))
    lines = []
    try:
        deadline = time.time() + 60
        url = None
        while time.time() < deadline and url is None:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            m = re.search(r"(http://127\.0\.0\.1:\d+)/", line)
            url = m.group(1) if m else None
        assert url, "server did not start:\n" + "".join(lines)
        threading.Thread(target=lambda: [lines.append(x) for x in proc.stdout], daemon=True).start()
        port = int(url.rsplit(":", 1)[1])
        for _ in range(100):
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                conn.request("GET", "/healthz")
                if conn.getresponse().status == 200:
                    break
            except OSError:
                time.sleep(0.1)
        yield url, db
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
    assert "Traceback" not in "".join(lines), "".join(lines)[-3000:]


class Participant:
    """One simulated participant on its own keep-alive connection."""

    def __init__(self, port: int):
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        self.cookie = None

    def request(self, method: str, path: str, body: str | None = None) -> tuple[int, dict, bytes]:
        headers = {"Content-Type": "application/x-www-form-urlencoded"} if body is not None else {}
        if self.cookie:
            headers["Cookie"] = f"{COOKIE}={self.cookie}"
        self.conn.request(method, path, body=body, headers=headers)
        r = self.conn.getresponse()
        data = r.read()
        if r.getheader("set-cookie"):
            self.cookie = re.search(COOKIE + r"=([^;]+)", r.getheader("set-cookie")).group(1)
        return r.status, dict(r.getheaders()), data


def test_many_participants_answer_concurrently_nothing_lost_or_duplicated(server):
    """50 participants at once (SIPAT_SURVEY_LOAD_PARTICIPANTS: another number, for a one-off larger run)."""
    url, db = server
    port = int(url.rsplit(":", 1)[1])
    n_participants = int(os.environ.get("SIPAT_SURVEY_LOAD_PARTICIPANTS", 50))
    start_line = threading.Barrier(n_participants, timeout=120)

    def take_survey(i: int) -> tuple[str, dict[int, str], int]:
        p = Participant(port)
        status, _, _ = p.request("POST", "/start", f"external_id=load-{i}")
        assert status == 303 and p.cookie
        start_line.wait()  # everyone answers at the same time
        answers, refused = {}, 0
        while True:
            status, headers, body = p.request("GET", "/question")
            if status == 303:
                assert headers["location"] == "/done"
                break
            pos, shown = int(ITEM.search(body.decode()).group(1)), SHOWN.search(body.decode()).group(1)
            if pos in (1, N_QUESTIONS):
                status, _, img = p.request("GET", f"/image/{pos}")
                assert status == 200 and img[:4] == b"\x89PNG"
            answer = ("perturbed", "unperturbed")[(i + pos) % 2]
            assert p.request("POST", "/answer", f"item={pos}&answer={answer}&shown={quote(shown)}")[0] == 303
            answers[pos] = answer
            if pos == 1 + i % N_QUESTIONS:  # a conflicting resubmission must be refused, not stored
                other = ("unperturbed", "perturbed")[(i + pos) % 2]
                status = p.request("POST", "/answer", f"item={pos}&answer={other}")[0]
                refused += status == 409
        status, _, body = p.request("GET", "/done")
        assert status == 200
        return f"load-{i}", answers, refused

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=n_participants) as pool:
        results = list(pool.map(take_survey, range(n_participants)))
    seconds = time.perf_counter() - t0

    store = SurveyStore(db)
    rows = [r for r in store.export_rows() if r["external_id"].startswith("load-")]
    store.close()
    sent = {(ext, pos): a for ext, answers, _ in results for pos, a in answers.items()}
    stored = {(r["external_id"], r["position"]): r["answer"] for r in rows}
    lost, duplicated = len(set(sent) - set(stored)), len(rows) - len(stored)
    refused = sum(r for _, _, r in results)
    with_time = sum(r["response_ms"] != "" for r in rows)
    print(f"\nload test: {n_participants} participants, {len(sent)} answers acknowledged, {len(rows)} stored, "
          f"{lost} lost, {duplicated} duplicated, {len(set(stored) - set(sent))} extra, {refused} of "
          f"{n_participants} conflicting resubmissions refused, {with_time} with a response time, {seconds:.1f} s")
    assert len(sent) == n_participants * N_QUESTIONS
    assert len(rows) == len(stored) == len(sent) and lost == duplicated == 0  # nothing lost, nothing duplicated
    assert stored == sent  # and every stored answer is the one given first
    assert refused == n_participants and with_time == len(rows)
    assert all(r["completed"] == 1 for r in rows)
    assert seconds < 240 * max(1, n_participants / 50)


def test_browser_completes_the_survey(server, tmp_path):
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        pytest.skip(f"headless Chromium not found ({CHROMIUM}, {CHROMEDRIVER}): install it with "
                    f"`apt-get install chromium chromium-driver` to run the browser test")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
        from selenium.webdriver.common.by import By
        from selenium.common.exceptions import WebDriverException
        from selenium.webdriver.support.wait import WebDriverWait
    except ImportError:
        pytest.skip("selenium is not installed: pip install -e '.[dev]'")
    url, db = server
    os.environ.setdefault("SE_OFFLINE", "true")  # never let Selenium Manager download a browser or driver
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                "--window-size=820,760"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)
    shot = Path(os.environ.get("SIPAT_SURVEY_SCREENSHOT", tmp_path / "question.png"))

    def images_loaded() -> bool:
        return driver.execute_script(
            "return Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)")

    def click(element) -> None:
        """Click, then wait until the next page has loaded (a click returns before navigation ends). The old page
        is marked; the wait ends when a complete document without the mark is there. Asking the old element
        whether it is stale races the navigation (chromedriver then answers with an error of its own, not
        "stale"), so errors while the page changes are polled through."""
        driver.execute_script("window.__left = false")
        element.click()
        WebDriverWait(driver, 30, ignored_exceptions=(WebDriverException,)).until(
            lambda d: d.execute_script("return window.__left === undefined && document.readyState === 'complete'"))

    clicks = []
    try:
        driver.get(url + "/?PROLIFIC_PID=browser-1")
        click(driver.find_element(By.CSS_SELECTOR, "button[type=submit]"))
        assert "Example 1 of 2" in driver.page_source and images_loaded()
        click(driver.find_element(By.LINK_TEXT, "Next example"))
        assert "Example 2 of 2" in driver.page_source and images_loaded()
        click(driver.find_element(By.LINK_TEXT, "Begin the survey"))
        for i in range(1, N_QUESTIONS + 1):
            assert driver.find_element(By.CSS_SELECTOR, ".progress span").text == f"Question {i} of {N_QUESTIONS}"
            assert images_loaded()
            if i == 7:
                driver.save_screenshot(str(shot))
            choice = "perturbed" if i % 3 == 0 else "unperturbed"
            click(driver.find_element(By.ID, choice))
            clicks.append(choice)
        code = driver.find_element(By.ID, "completion-code").text
        driver.get(url + "/")  # coming back after finishing: resumes at the completion page
        click(driver.find_element(By.LINK_TEXT, "Continue"))
        assert driver.find_element(By.ID, "completion-code").text == code
    finally:
        driver.quit()
    assert shot.stat().st_size > 5000
    store = SurveyStore(db)
    rows = [r for r in store.export_rows() if r["external_id"] == "browser-1"]
    store.close()
    assert [r["answer"] for r in rows] == clicks
    assert [r["position"] for r in rows] == list(range(1, N_QUESTIONS + 1)) and rows[-1]["completed"] == 1
    assert len(code) == 10
