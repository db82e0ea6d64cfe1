// conveyor console: the only script. Parts marked data-refresh="URL" reload themselves in place
// every data-every seconds (the page reads the same without it); a part whose content says
// data-state="done" stops. Nothing else runs here.
"use strict";
document.querySelectorAll("[data-refresh]").forEach((part) => {
  const url = part.getAttribute("data-refresh");
  const every = Number(part.getAttribute("data-every") || "5") * 1000;
  const tick = async () => {
    if (part.querySelector('[data-state="done"]')) return;
    try {
      const answer = await fetch(url, { credentials: "same-origin", headers: { "Accept": "text/html" } });
      if (answer.ok) {
        part.innerHTML = await answer.text();
        part.removeAttribute("data-stale");
      } else {
        part.setAttribute("data-stale", String(answer.status));
      }
    } catch (_) {
      part.setAttribute("data-stale", "unreachable");
    }
    setTimeout(tick, every);
  };
  setTimeout(tick, every);
});
