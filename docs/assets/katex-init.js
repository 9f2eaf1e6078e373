// Typeset the \( \) and \[ \] spans that pymdownx.arithmatex (generic mode) leaves in the page, with the KaTeX
// files vendored next to this script. Material for MkDocs re-runs this on every page it shows (document$).
function typesetMath(root) {
  renderMathInElement(root, {
    delimiters: [
      { left: "\\(", right: "\\)", display: false },
      { left: "\\[", right: "\\]", display: true },
    ],
    throwOnError: false,
  });
}
if (typeof document$ !== "undefined") document$.subscribe(({ body }) => typesetMath(body));
else document.addEventListener("DOMContentLoaded", () => typesetMath(document.body));
