// On the source pages, #L120-L135 highlights lines 120..135 and scrolls to the first (#L120: one line).
function markSourceLines() {
  document.querySelectorAll(".source-line-target").forEach((e) => e.classList.remove("source-line-target"));
  const m = location.hash.match(/^#L(\d+)(?:-L?(\d+))?$/);
  if (!m) return;
  const first = Number(m[1]), last = Number(m[2] || m[1]);
  for (let n = first; n <= last; n++) {
    const line = document.getElementById("__span-0-" + n);
    if (line) line.classList.add("source-line-target");
  }
  const top = document.getElementById("__span-0-" + first);
  if (top) window.scrollTo({ top: top.getBoundingClientRect().top + window.scrollY - 96 });
}
window.addEventListener("hashchange", markSourceLines);
if (typeof document$ !== "undefined") document$.subscribe(() => setTimeout(markSourceLines, 0));
else document.addEventListener("DOMContentLoaded", markSourceLines);
