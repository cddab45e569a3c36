// The gallery: filters apply as soon as they change, and a sample opens large in a dialog
// with its prompt, seed and scores.
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
})();
