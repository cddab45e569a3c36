// The jobs page refreshes itself: it polls /admin/api/jobs (same filters as the page) and
// updates the rows in place, and it sends cancel and retry without reloading the page. The
// poll is revalidated (304 while nothing changed); running jobs' durations are counted here,
// each second, from their start on the server's clock.
"use strict";

(function () {
  const POLL_MS = 2000;
  const TICK_MS = 1000;
  const table = document.querySelector("#jobs tbody");
  const template = document.getElementById("job-row-template");
  const csrf = document.querySelector('meta[name="csrf-token"]');
  const errorBox = document.getElementById("action-error");
  let timer = null;
  // The server's clock minus this browser's, from the last answer's Date header.
  let clockOffset = 0;

  // As the server words a duration (service/contexts/dashboard.py, format_duration).
  function formatDuration(seconds) {
    const total = Math.max(0, Math.floor(seconds));
    const hours = Math.floor(total / 3600);
    const minutes = Math.floor((total % 3600) / 60);
    const secs = total % 60;
    const two = (n) => String(n).padStart(2, "0");
    if (hours) return `${hours}h ${two(minutes)}m`;
    if (minutes) return `${minutes}m ${two(secs)}s`;
    return `${secs}s`;
  }

  function tickDurations() {
    const now = Date.now() + clockOffset;
    for (const row of table.querySelectorAll("tr[data-running-since]")) {
      text(row, "duration", formatDuration((now - Date.parse(row.dataset.runningSince)) / 1000));
    }
  }

  function text(row, field, value) {
    const node = row.querySelector(`[data-field="${field}"]`);
    if (node && node.textContent !== String(value)) node.textContent = value;
  }

  function fill(row, job) {
    row.className = `job status-${job.status}`;
    row.dataset.jobId = job.id;
    row.querySelector(".job-id code").textContent = job.id.slice(0, 8);
    row.querySelector(".job-id code").title = job.id;
    const kind = row.querySelector('[data-field="kind"]');
    if (job.target_url) {
      if (!kind.querySelector("a") || kind.textContent !== job.kind) {
        kind.textContent = "";
        const link = document.createElement("a");
        link.href = job.target_url;
        link.textContent = job.kind;
        kind.appendChild(link);
      }
    } else {
      text(row, "kind", job.kind);
    }
    for (const field of ["owner", "status", "stage", "progress_text", "attempts", "queued_at",
                         "started_at", "finished_at", "worker", "error", "traceback"]) {
      text(row, field, job[field]);
    }
    if (job.running_since) {
      row.dataset.runningSince = job.running_since;
    } else {
      delete row.dataset.runningSince;
      text(row, "duration", job.duration);
    }
    row.querySelector('[data-field="progress"]').value = job.progress;
    row.querySelector('[data-field="traceback-box"]').hidden = !job.traceback;
    for (const form of row.querySelectorAll("form.job-action")) {
      form.action = `/admin/jobs/${job.id}/${form.dataset.action}`;
      form.hidden = form.dataset.action === "cancel" ? !job.can_cancel : !job.can_retry;
    }
  }

  function newRow(job) {
    const row = template.content.querySelector("tr").cloneNode(true);
    fill(row, job);
    return row;
  }

  function render(data) {
    document.getElementById("queued-count").textContent = data.queue.queued;
    document.getElementById("running-count").textContent = data.queue.running;
    document.getElementById("workers-count").textContent = data.workers.length;
    const workers = document.getElementById("workers");
    workers.replaceChildren(...data.workers.map((worker) => {
      const item = document.createElement("li");
      const name = document.createElement("code");
      name.textContent = worker.name;
      const model = document.createElement("span");
      model.className = "muted";
      model.textContent = worker.model ?? "predictions";  // null: it draws no class
      item.append(name, " ", model,
                  worker.current_job_id ? ` on ${worker.current_job_id.slice(0, 8)}` : " idle");
      return item;
    }));
    for (const model of data.models) {
      const row = document.querySelector(`#model-backlog tr[data-model="${CSS.escape(model.name)}"]`);
      if (!row) continue;
      for (const field of ["queued", "running", "workers"]) text(row, field, model[field]);
    }
    const existing = new Map([...table.querySelectorAll("tr[data-job-id]")].map((r) => [r.dataset.jobId, r]));
    let previous = null;
    for (const job of data.jobs) {
      let row = existing.get(job.id);
      if (row) {
        fill(row, job);
        existing.delete(job.id);
      } else {
        row = newRow(job);
      }
      // Keep the server's order (newest first) without touching rows already in place.
      const expected = previous ? previous.nextElementSibling : table.firstElementChild;
      if (expected !== row) table.insertBefore(row, expected);
      previous = row;
    }
    for (const row of existing.values()) row.remove();
    document.getElementById("jobs-shown").textContent = `${data.jobs.length} of ${data.total} jobs`;
    const empty = document.getElementById("no-jobs");
    if (empty) empty.hidden = data.jobs.length > 0;
    tickDurations();
    document.getElementById("refreshed").textContent = `updated ${new Date().toLocaleTimeString()}`;
  }

  async function poll() {
    clearTimeout(timer);
    try {
      // "no-cache": the browser asks with the ETag it holds and reuses its copy on a 304.
      const response = await fetch(`/admin/api/jobs${window.location.search}`, {
        headers: { Accept: "application/json" }, credentials: "same-origin", cache: "no-cache",
      });
      if (response.status === 401) { window.location.reload(); return; }
      const served = Date.parse(response.headers.get("Date"));
      if (!Number.isNaN(served)) clockOffset = served - Date.now();
      if (response.ok) render(await response.json());
    } catch (error) {
      document.getElementById("refreshed").textContent = "not updating: the server is unreachable";
    } finally {
      timer = setTimeout(poll, POLL_MS);
    }
  }

  table.addEventListener("submit", async (event) => {
    const form = event.target.closest("form.job-action");
    if (!form) return;
    event.preventDefault();
    errorBox.hidden = true;
    const response = await fetch(form.action, {
      method: "POST",
      body: new FormData(form),
      headers: { Accept: "application/json", "X-CSRF-Token": csrf ? csrf.content : "" },
      credentials: "same-origin",
    });
    if (!response.ok) {
      let detail = response.statusText;
      try { detail = (await response.json()).detail || detail; } catch (error) { /* not JSON */ }
      errorBox.textContent = `Could not ${form.dataset.action} the job: ${detail}`;
      errorBox.hidden = false;
    }
    poll();
  });

  document.getElementById("job-filters").addEventListener("change", (event) => {
    event.currentTarget.submit();
  });

  tickDurations();
  setInterval(tickDurations, TICK_MS);
  timer = setTimeout(poll, POLL_MS);
})();
