/* Sort a table.sortable by a column when its header's button is pressed: numbers by value
   (first press: high to low), text by code point (first press: A to Z); a second press reverses.
   Empty and NaN cells stay last; equal keys keep their order. Reads each cell's data-v (the
   file's exact text). Without JavaScript the tables read in the file's order. */
(function () {
  "use strict";
  function key(cell, numeric) {
    var v = cell ? cell.getAttribute("data-v") : "";
    if (v === null || v === "") { return null; }
    if (!numeric) { return v; }
    if (v === "inf" || v === "+inf") { return Infinity; }
    if (v === "-inf") { return -Infinity; }
    var x = parseFloat(v);
    return isNaN(x) ? null : x;
  }
  function sortBy(table, th, col) {
    var numeric = th.getAttribute("data-type") === "num";
    var now = th.getAttribute("aria-sort");
    var desc = now ? now === "ascending" : numeric;
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function (h) { h.removeAttribute("aria-sort"); });
    th.setAttribute("aria-sort", desc ? "descending" : "ascending");
    var body = table.tBodies[0];
    var keyed = Array.prototype.map.call(body.rows, function (row, i) { return [key(row.cells[col], numeric), i, row]; });
    keyed.sort(function (a, b) {
      if (a[0] === null || b[0] === null) { return ((a[0] === null) - (b[0] === null)) || (a[1] - b[1]); }
      var c = numeric ? a[0] - b[0] : (a[0] < b[0] ? -1 : (a[0] > b[0] ? 1 : 0));
      return (desc ? -c : c) || (a[1] - b[1]);
    });
    keyed.forEach(function (k) { body.appendChild(k[2]); });
  }
  Array.prototype.forEach.call(document.querySelectorAll("table.sortable"), function (table) {
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function (th, col) {
      var button = th.querySelector("button");
      if (button) { button.addEventListener("click", function () { sortBy(table, th, col); }); }
    });
  });
})();
