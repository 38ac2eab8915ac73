// legato console: live updates (poll the page's fragment every 2 s) and confirmed actions. No dependencies.
(function () {
  "use strict";
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
