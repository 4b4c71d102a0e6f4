// Keys 1-5 rate the image; a second submit (double click, key repeat) is dropped so one
// look gives one rating. Buttons are not disabled: a disabled submitter would drop its value.
(function () {
  "use strict";
  var form = document.getElementById("rate-form");
  if (!form) return;
  var sent = false;
  form.addEventListener("submit", function (e) {
    if (sent) { e.preventDefault(); return; }
    sent = true;
    form.classList.add("sending");
  });
  document.addEventListener("keydown", function (e) {
    if (e.altKey || e.ctrlKey || e.metaKey || e.repeat) return;
    var button = document.getElementById("score-" + e.key);
    if (button && !sent) form.requestSubmit(button);
  });
})();
