// The keys page: a revoke is confirmed first (it cannot be undone), and a new key can be
// copied with one click.
"use strict";

(function () {
  document.getElementById("keys").addEventListener("submit", (event) => {
    const form = event.target.closest("form.revoke-key");
    if (!form) return;
    const own = form.dataset.own === "true"
      ? "\nIt is the key you signed in with: you will be signed out." : "";
    if (!window.confirm(`Revoke the key "${form.dataset.name}"? This cannot be undone.${own}`)) {
      event.preventDefault();
    }
  });

  const copy = document.getElementById("copy-key");
  if (copy && navigator.clipboard) {
    copy.hidden = false;
    copy.addEventListener("click", async () => {
      const done = document.getElementById("copy-done");
      try {
        await navigator.clipboard.writeText(document.getElementById("new-key-value").textContent);
        done.textContent = "copied";
      } catch (error) {
        done.textContent = "could not copy: select the key and copy it";
      }
    });
  }
})();
