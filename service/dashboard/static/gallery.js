// The gallery: filters apply as soon as they change, a sample opens large in a dialog with its
// prompt, seed and scores, and samples are reviewed without reloading the page: each tile's
// accept and reject buttons, or the keyboard on the focused tile (arrows or j / k to move, a to
// accept, r to reject, Enter to open it large).
"use strict";

(function () {
  const dialog = document.getElementById("sample-dialog");
  const filters = document.getElementById("gallery-filters");

  filters.addEventListener("change", (event) => {
    // A new sort key starts from its natural order: best scores first, indices ascending.
    if (event.target.id === "sort") {
      document.getElementById("order").value = event.target.value === "index" ? "asc" : "desc";
    }
    filters.submit();
  });

  function show(id, value) {
    document.getElementById(id).textContent = value === "" || value === undefined ? "–" : value;
  }

  function score(id, value) {
    show(id, value === "" || value === undefined ? "" : Number(value).toFixed(4));
  }

  document.getElementById("samples").addEventListener("click", (event) => {
    const link = event.target.closest("a.open-sample");
    if (!link || !dialog.showModal) return;
    event.preventDefault();
    const tile = link.closest(".sample");
    const data = tile.dataset;
    const image = document.getElementById("dialog-image");
    image.src = data.large;
    image.alt = `sample ${data.index}`;
    show("dialog-index", `#${data.index}`);
    show("dialog-prompt", data.prompt);
    show("dialog-prompt-kind", data.promptKind);
    show("dialog-seed", data.seed);
    show("dialog-size", data.size);
    score("dialog-clip-score", data.clipScore);
    score("dialog-shot-similarity", data.shotSimilarity);
    score("dialog-consensus-iou", data.consensusIou);
    score("dialog-ood-iou", data.oodIou);
    show("dialog-mask-source", data.maskSource);
    show("dialog-accepted", data.accepted);
    dialog.showModal();
  });

  dialog.addEventListener("click", (event) => {
    if (event.target === dialog) dialog.close();
  });

  // --- review ------------------------------------------------------------------------------

  const grid = document.getElementById("samples");
  const csrf = document.querySelector('meta[name="csrf-token"]');
  const errorBox = document.getElementById("review-error");
  const REVIEW_KEYS = { a: true, r: false };
  // Verdicts are sent one after another, so the accepted count shown is the last one's.
  let sending = Promise.resolve();
  let opened = null; // the tile shown in the dialog

  function tiles() {
    return [...grid.querySelectorAll(".tile.sample")];
  }

  function focusTile(tile) {
    for (const other of tiles()) other.tabIndex = other === tile ? 0 : -1;
    tile.focus();
  }

  function perRow() {
    const all = tiles();
    const top = all.length ? all[0].offsetTop : 0;
    const first = all.findIndex((tile) => tile.offsetTop !== top);
    return first === -1 ? Math.max(all.length, 1) : first;
  }

  function follow(rel, hash) {
    // Once the verdicts sent are answered: leaving the page would drop them.
    const link = document.querySelector(`nav.pages a[rel="${rel}"]`);
    if (link) sending.then(() => { window.location.href = `${link.href}${hash}`; });
  }

  function advance(tile) {
    const next = tile.nextElementSibling;
    if (next) focusTile(next);
  }

  function move(tile, step) {
    const all = tiles();
    const target = all.indexOf(tile) + step;
    if (target >= all.length) {
      if (step === 1) follow("next", "#review");
      else focusTile(all[all.length - 1]);
    } else if (target < 0) {
      if (step === -1) follow("prev", "#review-last");
      else focusTile(all[0]);
    } else {
      focusTile(all[target]);
    }
  }

  function showVerdict(tile, answer) {
    const verdict = answer.verdict;
    const label = tile.querySelector('[data-field="verdict"]');
    label.textContent = verdict.label;
    label.title = verdict.title;
    label.classList.toggle("accepted", verdict.accepted === true);
    label.classList.toggle("rejected", verdict.accepted === false);
    tile.classList.toggle("rejected", verdict.accepted === false);
    tile.dataset.accepted = verdict.title;
    tile.setAttribute("aria-label", `sample ${tile.dataset.index}, ${verdict.title.toLowerCase()}`);
    document.getElementById("num-accepted").textContent = answer.num_accepted;
    const summary = document.getElementById("report-summary");
    summary.textContent = summary.textContent.replace(/\d+ accepted$/, `${answer.num_accepted} accepted`);
  }

  function review(tile, accepted) {
    const form = tile.querySelector("form.review");
    const body = new FormData(form);
    body.set("accepted", accepted ? "true" : "false");
    tile.classList.add("pending");
    sending = sending.then(async () => {
      try {
        const response = await fetch(form.action, {
          method: "POST",
          body,
          headers: { Accept: "application/json", "X-CSRF-Token": csrf ? csrf.content : "" },
          credentials: "same-origin",
        });
        if (response.status === 401) { window.location.reload(); return; }
        if (!response.ok) {
          let detail = response.statusText;
          try { detail = (await response.json()).detail || detail; } catch (error) { /* not JSON */ }
          throw new Error(detail);
        }
        showVerdict(tile, await response.json());
        errorBox.hidden = true;
      } catch (error) {
        errorBox.textContent = `Sample #${tile.dataset.index} was not reviewed: ${error.message}`;
        errorBox.hidden = false;
      } finally {
        tile.classList.remove("pending");
      }
    });
  }

  grid.addEventListener("submit", (event) => {
    const form = event.target.closest("form.review");
    if (!form) return;
    event.preventDefault();
    const tile = form.closest(".tile.sample");
    focusTile(tile);
    review(tile, event.submitter ? event.submitter.value === "true" : true);
  });

  grid.addEventListener("focusin", (event) => {
    const tile = event.target.closest(".tile.sample");
    if (tile && tile.tabIndex !== 0) {
      for (const other of tiles()) other.tabIndex = other === tile ? 0 : -1;
    }
  });

  grid.addEventListener("keydown", (event) => {
    if (event.altKey || event.ctrlKey || event.metaKey) return;
    const tile = event.target.closest(".tile.sample");
    if (!tile) return;
    const key = event.key.length === 1 ? event.key.toLowerCase() : event.key;
    if (key === "ArrowRight" || key === "j") move(tile, 1);
    else if (key === "ArrowLeft" || key === "k") move(tile, -1);
    else if (key === "ArrowDown") move(tile, perRow());
    else if (key === "ArrowUp") move(tile, -perRow());
    else if (key in REVIEW_KEYS) { review(tile, REVIEW_KEYS[key]); advance(tile); }
    else if (key === "Enter" && event.target === tile) {
      opened = tile;
      tile.querySelector("a.open-sample").click();
    } else return;
    event.preventDefault();
  });

  // The first key pressed with nothing focused starts at the gallery's current tile.
  document.addEventListener("keydown", (event) => {
    if (event.defaultPrevented || document.activeElement !== document.body || dialog.open) return;
    if (event.altKey || event.ctrlKey || event.metaKey) return;
    const key = event.key.length === 1 ? event.key.toLowerCase() : event.key;
    const start = grid.querySelector('.tile.sample[tabindex="0"]');
    if (start && (key in REVIEW_KEYS || ["ArrowRight", "ArrowLeft", "ArrowDown", "ArrowUp",
                                         "j", "k"].includes(key))) {
      focusTile(start);
      event.preventDefault();
    }
  });

  grid.addEventListener("click", (event) => {
    const link = event.target.closest("a.open-sample");
    if (link) opened = link.closest(".tile.sample");
  });

  // In the large view, a and r review the sample shown, and go on to the next.
  dialog.addEventListener("keydown", (event) => {
    const key = event.key.length === 1 ? event.key.toLowerCase() : event.key;
    if (!opened || !(key in REVIEW_KEYS) || event.altKey || event.ctrlKey || event.metaKey) return;
    event.preventDefault();
    review(opened, REVIEW_KEYS[key]);
    dialog.close();
    advance(opened);
  });

  dialog.addEventListener("close", () => {
    if (opened && !grid.contains(document.activeElement)) focusTile(opened);
  });

  // Arriving from the previous or next page by keyboard: go on where the review was.
  const all = tiles();
  if (all.length && window.location.hash === "#review") focusTile(all[0]);
  if (all.length && window.location.hash === "#review-last") focusTile(all[all.length - 1]);
})();
