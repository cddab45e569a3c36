// The gallery: filters apply as soon as they change, and a sample opens large in a dialog
// with its prompt, seed and scores.
"use strict";

(function () {
  const dialog = document.getElementById("sample-dialog");
  const filters = document.getElementById("gallery-filters");

  filters.addEventListener("change", () => filters.submit());

  function show(id, value) {
    document.getElementById(id).textContent = value === "" || value === undefined ? "–" : value;
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
    show("dialog-clip-score", data.clipScore);
    show("dialog-shot-similarity", data.shotSimilarity);
    show("dialog-consensus-iou", data.consensusIou);
    show("dialog-ood-iou", data.oodIou);
    show("dialog-mask-source", data.maskSource);
    show("dialog-accepted", data.accepted);
    dialog.showModal();
  });

  dialog.addEventListener("click", (event) => {
    if (event.target === dialog) dialog.close();
  });
})();
