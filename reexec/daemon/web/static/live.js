// Refreshes the overview's #live section from its data-src every few seconds. The fragment is
// server-rendered, escaped HTML from the same origin; nothing from the page's data is executed.
(function () {
  "use strict";
  var box = document.getElementById("live");
  var state = document.getElementById("live-state");
  if (!box) return;
  var src = box.getAttribute("data-src");
  function tick() {
    fetch(src, { cache: "no-store" })
      .then(function (r) {
        if (!r.ok) throw new Error(r.status);
        return r.text();
      })
      .then(function (html) {
        box.innerHTML = html;
        if (state) { state.textContent = "live"; state.className = ""; }
      })
      .catch(function () {
        if (state) { state.textContent = "offline"; state.className = "stale"; }
      })
      .finally(function () { setTimeout(tick, 2000); });
  }
  setTimeout(tick, 2000);
})();
