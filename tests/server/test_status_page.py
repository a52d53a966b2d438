"""The status page in a real headless browser (playwright driving Debian's chromium): it loads with no
console errors, lists a live session whose KV is in device memory, and shows it on disk once the
session is parked, without a reload (the page polls its JSON). Also `GET /v1/sessions/{id}`'s
kv_location and kv_stats. KVSTRATA_WRITE_SCREENSHOT=1 saves the page to docs/status_page.png."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import httpx
import pytest

from tests.server.harness import REPO, make_engine, serve


@pytest.fixture
def disk_server(tiny_llama, tmp_path):
    from kvstrata.sessions import open_store

    ae = make_engine(str(tiny_llama), kv_device_bytes="64M", kv_disk_dir=str(tmp_path / "kv"))
    store = open_store(tmp_path / "sessions.db")
    try:
        with serve(ae, store) as srv:
            yield srv
    finally:
        ae.shutdown()
        store.close()


def _turn(u: str, sid: str, text: str) -> dict:
    r = httpx.post(f"{u}/v1/sessions/{sid}/generate", timeout=60, json={
        "messages": [{"role": "user", "content": text}], "max_tokens": 8, "temperature": 0})
    assert r.status_code == 200, r.text
    return r.json()


def test_session_reports_where_its_kv_is_and_what_it_cost(disk_server):
    u = disk_server.url
    sid = httpx.post(u + "/v1/sessions", json={"system": "You are terse."}).json()["id"]
    _turn(u, sid, "Tell me about tiers. " * 8)
    s = httpx.get(f"{u}/v1/sessions/{sid}").json()
    assert s["kv_location"].get("device", 0) > 0 and s["kv_stats"]["turns"] == 1
    assert s["kv_stats"]["computed_tokens"] > 0 and s["kv_stats"]["parked_s"] == 0
    park = httpx.post(f"{u}/v1/sessions/{sid}/park", json={"tier": "disk"}).json()
    assert park["kv"]["moved"] is True
    time.sleep(0.2)
    s = httpx.get(f"{u}/v1/sessions/{sid}").json()
    assert s["kv_location"].get("disk", 0) > 0 and s["kv_location"].get("device", 0) == 0
    assert s["kv_stats"]["bytes_moved_down"] > 0 and s["kv_stats"]["parked_s"] > 0
    _turn(u, sid, "And again?")  # the next turn restores the history from disk instead of computing it
    k = httpx.get(f"{u}/v1/sessions/{sid}").json()["kv_stats"]
    assert k["turns"] == 2 and k["restored_tokens"].get("disk", 0) > 0 and k["bytes_restored"] > 0
    assert k["recompute_avoided_tokens"] == sum(k["restored_tokens"].values())


def test_status_page_shows_a_session_move_from_device_to_disk(disk_server, tmp_path):
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "chromium is not installed: `apt-get install chromium` (make install does it as root)"
    u = disk_server.url
    sid = httpx.post(u + "/v1/sessions", json={"system": "You are terse."}).json()["id"]
    _turn(u, sid, "Tell me about tiers. " * 8)
    errors: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(u + "/status")
            row = page.locator("#sessions tbody tr", has_text=sid)
            kv = row.locator("td[data-kv]")
            kv.wait_for(timeout=15000)
            page.wait_for_function("""sid => [...document.querySelectorAll('#sessions tbody tr')]
                .some(r => r.textContent.includes(sid) && r.querySelector('td[data-kv]').dataset.kv.includes('device'))""",
                                   arg=sid, timeout=15000)
            assert "device" in page.locator("#tiers tbody").inner_text()
            assert "disk" in page.locator("#tiers tbody").inner_text()
            assert httpx.post(f"{u}/v1/sessions/{sid}/park", json={"tier": "disk"}).json()["kv"]["moved"]
            page.wait_for_function("""sid => [...document.querySelectorAll('#sessions tbody tr')].some(r =>
                r.textContent.includes(sid) && r.querySelector('td[data-kv]').dataset.kv === 'disk')""",
                                   arg=sid, timeout=15000)
            assert "parked (disk)" in row.inner_text()
            assert "/v1/sessions/{session_id}/park" in page.locator("#requests").inner_text()
            shot = tmp_path / "status.png"
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 10_000
            if os.environ.get("KVSTRATA_WRITE_SCREENSHOT") == "1":
                shutil.copy(shot, Path(REPO) / "docs" / "status_page.png")
        finally:
            browser.close()
    assert errors == []


def test_grafana_dashboard_queries_metrics_the_server_exports(disk_server):
    import json
    import re

    dash = json.loads((Path(REPO) / "docs" / "grafana" / "kvstrata.json").read_text())
    exported = set(re.findall(r"^# TYPE (\w+) (\w+)", httpx.get(disk_server.url + "/metrics").text, re.M))
    names = {n for n, _ in exported} | {n + s for n, t in exported if t in ("counter", "histogram")
                                         for s in ("_total", "_bucket")}
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    assert len(exprs) >= 10
    for e in exprs:
        used = set(re.findall(r"\bkvstrata_\w+", e))
        assert used and used <= names, (e, used - names)
