// legato console: live updates (poll the page's fragment every 2 s), confirmed actions, and the workflow graph
// drawn by the vendored Mermaid (static/vendor/mermaid.min.js, loaded only by the pages that show a graph).
(function () {
  "use strict";
  var drawn = {text: null, svg: null, n: 0};
  // Draw the Mermaid source in <pre id="graph"> as SVG into #graph-drawn. The page polls every 2 s and replaces
  // the fragment: an unchanged source reuses the last SVG instead of drawing again (no flicker).
  function drawGraph() {
    var source = document.getElementById("graph");
    var box = document.getElementById("graph-drawn");
    if (!source || !box || !window.mermaid) { return; }
    var text = source.textContent;
    if (text === drawn.text && drawn.svg !== null) { box.innerHTML = drawn.svg; box.dataset.drawn = "1"; return; }
    drawn.n += 1;
    window.mermaid.render("graph-svg-" + drawn.n, text).then(function (result) {
      drawn.text = text;
      drawn.svg = result.svg;
      var current = document.getElementById("graph-drawn");  // the fragment may have been replaced meanwhile
      if (current) { current.innerHTML = result.svg; current.dataset.drawn = "1"; }
    }).catch(function (err) {
      box.textContent = "cannot draw the graph: " + (err && err.message ? err.message : err);
      box.dataset.drawn = "error";
    });
  }
  if (window.mermaid) {
    window.mermaid.initialize({startOnLoad: false, securityLevel: "strict", theme: "default", flowchart: {useMaxWidth: true}});
    drawGraph();
  }
  var live = document.getElementById("live");
  if (live && live.dataset.poll) {
    var busy = false;
    setInterval(function () {
      if (busy || document.hidden) { return; }
      busy = true;
      fetch(live.dataset.poll, {credentials: "same-origin", headers: {"Accept": "text/html"}})
        .then(function (r) { return r.ok ? r.text() : null; })
        .then(function (html) {
          if (html === null) { return; }
          // keep <details> the reader opened
          var open = Array.prototype.map.call(live.querySelectorAll("details[open]"), function (d) { return d.parentNode.textContent; });
          live.innerHTML = html;  // server-rendered and escaped
          Array.prototype.forEach.call(live.querySelectorAll("details"), function (d) {
            if (open.indexOf(d.parentNode.textContent) >= 0) { d.open = true; }
          });
          drawGraph();
        })
        .catch(function () {})
        .finally(function () { busy = false; });
    }, 2000);
  }
  Array.prototype.forEach.call(document.querySelectorAll("form[data-confirm]"), function (form) {
    form.addEventListener("submit", function (event) {
      if (!window.confirm(form.dataset.confirm)) { event.preventDefault(); }
    });
  });
  Array.prototype.forEach.call(document.querySelectorAll("#filters select"), function (select) {
    select.addEventListener("change", function () { select.form.submit(); });
  });
})();
