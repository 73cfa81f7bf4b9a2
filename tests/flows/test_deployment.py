"""Operations for real: `python -m ppoflow.serve` (what `make serve` runs) brings up a Prefect server on loopback with
its UI, the process work pool, prefect.yaml's deployments and a worker; `prefect deployment run` trains, and headless
Chromium shows the run's artifacts in Prefect's UI as a person sees them; a flow-run process SIGKILLed mid-iteration
is resumed by `prefect flow-run retry` without recomputing any committed stage.

The browser is Debian's Chromium (`apt-get install -y chromium`; .ci/run installs it when absent), driven by
Playwright with no browser download. PPOFLOW_UI_SCREENSHOTS=DIR keeps the screenshots it takes (docs/ holds one).
Run alone:  .venv/bin/pytest tests/flows/test_deployment.py
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from workers.cluster import free_port

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
PREFECT = str(Path(sys.executable).with_name("prefect"))
CHROMIUM = "/usr/bin/chromium"
# As root Chromium needs --no-sandbox; on a machine without a network the rest keep it from trying (and logging)
# its update, sync and QUIC connections. Playwright adds --headless and a fresh profile folder per launch.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]




@pytest.fixture(scope="module")
def prefect_api(tmp_path_factory, reap_session):
    """The documented bring-up, in its own session so that everything it starts is torn down with it."""
    home = tmp_path_factory.mktemp("prefect-server")
    port = free_port()
    log = home / "serve.log"
    with log.open("w") as out:
        serve = subprocess.Popen([sys.executable, "-m", "ppoflow.serve", "--home", str(home), "--port", str(port)],
                                 cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while "ready:" not in log.read_text():
            assert serve.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(1)
        yield {"PREFECT_API_URL": f"http://127.0.0.1:{port}/api", "PREFECT_HOME": str(home)}
    finally:
        serve.send_signal(signal.SIGTERM)
        try:
            serve.wait(timeout=60)
        finally:
            reap_session(serve.pid)


def _prefect(api: dict, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([PREFECT, *args], env={**os.environ, **api}, cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def _overrides(tmp_path, tiny_model_dir, prompts_dir, test_scale, iterations: int, *extra: str) -> str:
    return json.dumps([f"model.path={tiny_model_dir}", f"data.prompts={prompts_dir}/train.jsonl",
                       f"eval.prompts={prompts_dir}/eval.jsonl", "eval.max_prompts=16",
                       f"storage.root={tmp_path}", f"iterations={iterations}", *test_scale, *extra])


def _events(run: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((run / "events").iterdir())]


def test_deployment_run_trains_and_reports(prefect_api, tmp_path, sft_model_dir, prompts_dir, test_scale):
    # The SFT'd tiny model: its rewards and pass rates differ from 0, so the UI's numbers have something to show.
    out = _prefect(prefect_api, "deployment", "run", "ppo-train/quickstart", "-p", "run_id=deployed",
                   "-p", f"overrides={_overrides(tmp_path, sft_model_dir, prompts_dir, test_scale, 2)}", "--watch")
    assert out.returncode == 0 and "Completed" in out.stdout, out.stdout[-3000:] + out.stderr[-3000:]
    run = tmp_path / "deployed"
    for n in (1, 2):
        for stage in ("generate", "score", "advantages", "update", "sync"):
            assert (run / f"iter-{n:06d}" / stage / "_SUCCESS.json").exists()
    manifest = json.loads((run / "run.json").read_text())
    assert manifest["config"]["iterations"] == 2  # the partial override kept the rest of quickstart.yaml
    assert manifest["config"]["algo"]["estimator"] == "gae"
    for key in ("deployed-iterations", "deployed-rollouts", "deployed-overview", "deployed-progress"):
        art = _prefect(prefect_api, "artifact", "inspect", key, timeout=60)
        assert f"'key': '{key}'" in art.stdout, art.stdout + art.stderr
    flow_run_id = re.search(r"UUID: ([0-9a-f-]{36})", out.stdout).group(1)
    logs = _prefect(prefect_api, "flow-run", "logs", flow_run_id, timeout=60).stdout
    assert re.search(r"\(VLLMEngine pid=\d+\) ", logs), logs[-3000:]  # what the vLLM actor printed
    assert re.search(r"\(PolicyWorker pid=\d+\) ", logs)  # ... and the DeepSpeed policy actor
    assert "Autoscaler status" not in logs  # Ray's cluster status dumps stay out (stages/setup.py)

    request = urllib.request.Request(f"{prefect_api['PREFECT_API_URL']}/task_runs/filter", method="POST",
                                     data=json.dumps({"flow_runs": {"id": {"any_": [flow_run_id]}}}).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as r:
        task_runs = {t["name"]: t for t in json.load(r)}
    for n in (1, 2):  # a task run per stage and iteration, each with its seconds
        for stage in ("generate", "score", "advantages", "update", "sync", "evaluate", "report"):
            assert task_runs[f"{stage}-{n}"]["state_type"] == "COMPLETED"
            assert task_runs[f"{stage}-{n}"]["total_run_time"] > 0

    shots = tmp_path / "screenshots"
    _check_ui(prefect_api["PREFECT_API_URL"].removesuffix("/api"), flow_run_id, run, shots)
    if keep := os.environ.get("PPOFLOW_UI_SCREENSHOTS"):
        shutil.copytree(shots, keep, dirs_exist_ok=True)


def _shown(value: float) -> str:
    """How the UI prints a number of the iterations table (the report rounds to 4 digits; JavaScript drops `.0`)."""
    value = round(value, 4)
    return str(int(value)) if value == int(value) else repr(value)


def _check_ui(ui: str, flow_run_id: str, run: Path, shots: Path) -> None:
    """A person's view of the run in Prefect's UI: the flow run page's Artifacts tab lists the report's four artifacts
    once each, and each one's page shows its content: both iterations' numbers as the commit markers hold them, the
    best and worst samples of iteration 2, the curves picture (decoded by the browser) and 100% progress."""
    from playwright.sync_api import sync_playwright

    from storage.run import RunStore

    assert os.path.exists(CHROMIUM), f"no {CHROMIUM}: apt-get install -y chromium (.ci/run installs it when absent)"
    marker = lambda n, stage: json.loads((run / f"iter-{n:06d}" / stage / "_SUCCESS.json").read_text())  # noqa: E731
    shots.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            # Tall: the tab's cards sit below the run's graph, and its list renders only the cards in view.
            page = browser.new_page(viewport={"width": 1600, "height": 1400})
            page.set_default_timeout(60_000)

            def open_artifact(name: str) -> str:
                """Open the flow run, its Artifacts tab, then the card of `name`; returns the artifact page's text."""
                page.goto(f"{ui}/runs/flow-run/{flow_run_id}")
                page.get_by_text("Artifacts", exact=True).first.click()
                card = page.get_by_text(f"deployed-{name}", exact=True)
                card.wait_for()  # rendered text, not a sleep: the UI fetches the artifacts after the page
                if name == "iterations":
                    snap("flow-run-artifacts")
                    assert {a: page.get_by_text(f"deployed-{a}", exact=True).count()
                            for a in ("iterations", "rollouts", "overview", "progress")} == dict.fromkeys(
                        ("iterations", "rollouts", "overview", "progress"), 1)  # updated in place, not one per report
                card.click()
                page.wait_for_url("**/artifacts/artifact/**")
                page.get_by_text("Show raw data").wait_for()
                return page.locator(".p-layout-well__content").first.inner_text()

            def snap(name: str) -> None:
                # After the checks (the content is there); "disabled" ends the page's fade-in transition first.
                page.screenshot(path=shots / f"{name}.png", animations="disabled")

            def table() -> list[dict]:
                page.locator("tbody tr").first.wait_for()
                header = [h.strip() for h in page.locator("thead th").all_inner_texts()]
                return [dict(zip(header, (c.strip() for c in row.locator("td").all_inner_texts())))
                        for row in page.locator("tbody tr").all()]

            open_artifact("iterations")
            rows = {r["iteration"]: r for r in table()}
            assert sorted(rows) == ["0", "1", "2"], rows
            for n in (0, 1, 2):
                assert rows[str(n)]["eval_pass_rate"] == _shown(marker(n, "eval")["metrics"]["eval/pass_rate"])
            for n in (1, 2):
                assert rows[str(n)]["reward"] == _shown(marker(n, "score")["metrics"]["rollout/reward_mean"])
                assert rows[str(n)]["kl"] == _shown(marker(n, "advantages")["metrics"]["rollout/kl"])
                for stage in ("generate", "score", "advantages", "update", "sync"):
                    assert rows[str(n)][f"{stage}_s"] == _shown(marker(n, stage)["seconds"])
            snap("iterations")

            open_artifact("rollouts")
            samples = RunStore(str(run)).read_stage(2, "advantages").select(
                ["sample_id", "reward", "prompt", "response"]).to_pylist()
            ranked = [s["sample_id"] for s in sorted(samples, key=lambda s: -s["reward"])]
            shown = table()
            assert [(r["which"], r["sample"]) for r in shown] == [("best", s) for s in ranked[:4]] + [
                ("worst", s) for s in ranked[::-1][:4]]
            rendered = lambda t: " ".join(t.replace("\n", "⏎").split())  # noqa: E731  (as the page shows it)
            stored = {s["sample_id"]: s for s in samples}
            for r in shown:
                assert (rendered(r["prompt"]), rendered(r["response"])) == (
                    rendered(stored[r["sample"]]["prompt"]), rendered(stored[r["sample"]]["response"])), r
            snap("rollouts")

            text = open_artifact("overview")
            assert "run deployed: iteration 2 of 2" in text and f"storage: {run}" in text, text
            picture = page.locator("img[src^='data:image/png;base64,']")
            assert picture.evaluate("img => img.complete && img.naturalWidth") == 800  # decoded, not a broken icon
            snap("overview")

            assert "Progress: 100%" in open_artifact("progress")
            snap("progress")
        finally:
            browser.close()


def test_killed_flow_run_is_retried_without_recomputing_committed_stages(prefect_api, tmp_path, tiny_model_dir,
                                                                           prompts_dir, test_scale):
    # The fault fires once (PPOFLOW_FAULTS_ONCE_DIR): the retried flow run inherits the same job variables.
    env = {"PPOFLOW_FAULTS": "update.after_train@1=kill", "PPOFLOW_FAULTS_ONCE_DIR": str(tmp_path / "faults")}
    # The HF engine starts in seconds (vLLM: ~40 s per attempt); the test above runs the deployment on vLLM.
    overrides = _overrides(tmp_path, tiny_model_dir, prompts_dir, test_scale, 1, "generation.backend=hf")
    first = _prefect(prefect_api, "deployment", "run", "ppo-train/quickstart", "-p", "run_id=killed",
                     "-p", f"overrides={overrides}",
                     "--job-variable", f"env={json.dumps(env)}", "--watch")
    assert first.returncode != 0 and "Crashed" in first.stdout, first.stdout[-3000:] + first.stderr[-3000:]
    flow_run_id = re.search(r"UUID: ([0-9a-f-]{36})", first.stdout).group(1)
    run = tmp_path / "killed"
    assert (run / "iter-000001" / "advantages" / "_SUCCESS.json").exists()
    assert not (run / "iter-000001" / "update" / "_SUCCESS.json").exists()
    before = {p: p.read_bytes() for p in run.glob("iter-*/*/_SUCCESS.json")}

    retry = _prefect(prefect_api, "flow-run", "retry", flow_run_id, timeout=120)
    assert retry.returncode == 0, retry.stdout + retry.stderr
    deadline = time.monotonic() + 900
    while True:  # `flow-run watch` returns at once on the retry's Scheduled state: poll the state instead
        state = re.search(r"state_type=StateType\.(\w+)",
                          _prefect(prefect_api, "flow-run", "inspect", flow_run_id, timeout=60).stdout).group(1)
        if state in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") or time.monotonic() > deadline:
            break
        time.sleep(5)
    assert state == "COMPLETED"

    for stage in ("generate", "score", "advantages", "update", "sync"):
        assert (run / "iter-000001" / stage / "_SUCCESS.json").exists()
    for path, data in before.items():
        assert path.read_bytes() == data  # nothing committed was rewritten
    ran = [(e["stage"], e.get("iteration")) for e in _events(run) if e["action"] == "ran"]
    expected = {(s, 1) for s in ("generate", "score", "advantages", "update", "sync")}
    assert sorted(ran) == sorted(expected | {("eval", n) for n in (0, 1)})  # each exactly once over both attempts
    resumed = [e for e in _events(run) if e["pid"] != _events(run)[0]["pid"]]
    assert {(e["stage"], e["action"]) for e in resumed if e.get("iteration") == 1} == {
        ("generate", "skipped"), ("score", "skipped"), ("advantages", "skipped"), ("update", "ran"), ("sync", "ran"),
        ("eval", "ran")}
