"""The overview page (ops/overview.py, docs/overview-page.md): one self-contained HTML file, its
style and script inline, its data from `cases.js` beside it (a `<script src>`, which a page opened
from disk may load, where fetch() of a JSON file is refused). No network: no CDN, no fonts.

The script filters (room, verdict, waiting for a sign-off, date range), searches and pages (100
cases a page: 10,000 cases render as fast as 100) and draws the per-room QA trend as inline SVG.
The filters live in the URL's fragment (`index.html#room=G2&verdict=FAIL&unsigned=1`), so a view
can be bookmarked or sent. A script error is shown on the page (#errors), not only in a console.
"""

PAGE = r"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>mqi_communicator: QA overview</title>
<style>
body { font: 14px/1.35 system-ui, sans-serif; margin: 1em 2em; color: #222; }
h1 { font-size: 1.4em; margin: 0 0 .2em; } h2 { font-size: 1.15em; margin: 1.2em 0 .4em; }
#filters { display: flex; flex-wrap: wrap; gap: .6em 1.2em; align-items: end; margin: .6em 0; }
#filters label { display: flex; flex-direction: column; font-size: .85em; color: #555; }
#filters label.check { flex-direction: row; align-items: center; gap: .3em; }
table { border-collapse: collapse; width: 100%; }
th, td { text-align: left; padding: .25em .5em; border-bottom: 1px solid #ddd; vertical-align: top; }
th { background: #f3f3f3; position: sticky; top: 0; }
.v-PASS { color: #0a6b0a; font-weight: bold; } .v-FAIL { color: #b00; font-weight: bold; }
.v-other { color: #a65f00; font-weight: bold; }
.s-unsigned, .s-void { color: #a65f00; } .s-rejected { color: #b00; } .s-signed { color: #0a6b0a; }
.label { font-size: .8em; background: #eee; border-radius: 3px; padding: 0 .3em; margin-right: .2em; }
#pager { margin: .6em 0; display: flex; gap: .8em; align-items: center; }
#errors:not(:empty) { background: #fdd; color: #900; padding: .5em; white-space: pre-wrap; }
.trend { display: inline-block; margin: 0 1em 1em 0; vertical-align: top; }
.trend p { margin: .2em 0; font-size: .85em; max-width: 460px; }
.muted { color: #777; }
</style>
</head>
<body>
<div id="errors"></div>
<h1>QA overview</h1>
<div class="muted" id="generated"></div>
<div id="filters">
  <label>search <input id="q" type="search" placeholder="case, label, signer"></label>
  <label>room <select id="room"><option value="">all</option></select></label>
  <label>verdict <select id="verdict"><option value="">all</option></select></label>
  <label>finished from <input id="from" type="date"></label>
  <label>to <input id="to" type="date"></label>
  <label class="check"><input id="unsigned" type="checkbox"> waiting for sign-off</label>
</div>
<div id="counts"></div>
<div id="pager"><button id="prev">&larr; previous</button><span id="page"></span>
<button id="next">next &rarr;</button></div>
<table>
<thead><tr><th>case</th><th>room</th><th>finished</th><th>delivered</th><th>verdict</th>
<th>labels</th><th>sign-off</th><th>links</th></tr></thead>
<tbody id="rows"></tbody>
</table>
<h2>QA trend per room</h2>
<div class="muted">Primary gamma pass rate per beam, in delivery order; dotted: TG-218's 95 % and
90 %; dashed: the process's lower limit (docs/alerts-and-trend.md); red: below its process limit.</div>
<div id="trend"></div>
<div id="render-ms" hidden></div>
<script>
window.addEventListener("error", function (e) {
  document.getElementById("errors").textContent += "Error: " + e.message + "\n";
});
</script>
<script src="cases.js"></script>
<script>
"use strict";
(function () {
  var PAGE_SIZE = 100;
  var data = window.MQI_OVERVIEW;
  if (!data) { throw new Error("cases.js is missing or did not load: regenerate with bin/mqi overview"); }
  var col = {};
  data.columns.forEach(function (name, i) { col[name] = i; });
  var cases = data.cases;
  var haystack = cases.map(function (c) {
    return [c[col.case], c[col.room], c[col.verdict], c[col.labels], c[col.signoff_summary],
            c[col.state], c[col.finished], c[col.delivered]].join(" ").toLowerCase();
  });
  var $ = function (id) { return document.getElementById(id); };
  var esc = function (s) {
    return String(s).replace(/[&<>"']/g, function (ch) {
      return {"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}[ch];
    });
  };
  var href = function (p) { return esc(p.split("/").map(encodeURIComponent).join("/")); };
  var distinct = function (name) {
    var seen = {};
    cases.forEach(function (c) { if (c[col[name]]) { seen[c[col[name]]] = 1; } });
    return Object.keys(seen).sort();
  };
  var fill = function (id, values) {
    values.forEach(function (v) {
      var o = document.createElement("option"); o.value = v; o.textContent = v; $(id).appendChild(o);
    });
  };
  fill("room", distinct("room"));
  fill("verdict", distinct("verdict"));
  $("generated").textContent = "generated " + data.generated + "; " + cases.length + " cases";

  var fields = ["q", "room", "verdict", "from", "to"];
  var view = {page: 1};
  function readHash() {
    var params = new URLSearchParams(location.hash.replace(/^#/, ""));
    fields.forEach(function (f) { $(f).value = params.get(f) || ""; });
    $("unsigned").checked = params.get("unsigned") === "1";
    view.page = Math.max(1, parseInt(params.get("page") || "1", 10) || 1);
  }
  function writeHash() {
    var params = new URLSearchParams();
    fields.forEach(function (f) { if ($(f).value) { params.set(f, $(f).value); } });
    if ($("unsigned").checked) { params.set("unsigned", "1"); }
    if (view.page > 1) { params.set("page", String(view.page)); }
    history.replaceState(null, "", "#" + params.toString());
  }
  function matches() {
    var q = $("q").value.trim().toLowerCase(), room = $("room").value, verdict = $("verdict").value;
    var from = $("from").value, to = $("to").value, unsigned = $("unsigned").checked;
    var out = [];
    for (var i = 0; i < cases.length; i++) {
      var c = cases[i], day = c[col.finished].slice(0, 10);
      if (room && c[col.room] !== room) { continue; }
      if (verdict && c[col.verdict] !== verdict) { continue; }
      if (unsigned && !(c[col.state] === "finished" &&
          (c[col.signoff] === "unsigned" || c[col.signoff] === "void"))) { continue; }
      if (from && day < from) { continue; }
      if (to && day > to) { continue; }
      if (q && haystack[i].indexOf(q) < 0) { continue; }
      out.push(c);
    }
    return out;
  }
  function row(c) {
    var v = c[col.verdict], vclass = v === "PASS" || v === "FAIL" ? "v-" + v : "v-other";
    var labels = c[col.labels] ? c[col.labels].split(" ").map(function (l) {
      return '<span class="label">' + esc(l) + "</span>"; }).join("") : "";
    var links = [["sheet", "sheet"], ["pdf", "PDF"], ["signed_pdf", "signed PDF"]]
      .filter(function (l) { return c[col[l[0]]]; })
      .map(function (l) { return '<a class="' + l[0] + '" href="' + href(c[col[l[0]]]) + '">' + l[1] + "</a>"; });
    var state = c[col.state] === "finished" ? "" : ' <span class="muted">(' + esc(c[col.state]) + ")</span>";
    return '<tr data-case="' + esc(c[col.case]) + '"><td>' + esc(c[col.case]) + state + "</td><td>" +
      esc(c[col.room]) + "</td><td>" + esc(c[col.finished]) + "</td><td>" + esc(c[col.delivered]) +
      '</td><td class="verdict ' + vclass + '">' + esc(v) + "</td><td>" + labels +
      '</td><td class="signoff s-' + esc(c[col.signoff]) + '">' + esc(c[col.signoff_summary]) +
      "</td><td>" + links.join(" ") + "</td></tr>";
  }
  function render() {
    var shown = matches(), pages = Math.max(1, Math.ceil(shown.length / PAGE_SIZE));
    view.page = Math.min(view.page, pages);
    var first = (view.page - 1) * PAGE_SIZE, slice = shown.slice(first, first + PAGE_SIZE);
    $("rows").innerHTML = slice.map(row).join("");
    var counts = {};
    shown.forEach(function (c) { counts[c[col.verdict]] = (counts[c[col.verdict]] || 0) + 1; });
    $("counts").textContent = shown.length + " of " + cases.length + " cases match: " +
      Object.keys(counts).sort().map(function (k) { return counts[k] + " " + (k || "no verdict"); }).join(", ");
    $("page").textContent = shown.length ? "cases " + (first + 1) + "\u2013" + (first + slice.length) +
      " of " + shown.length + " (page " + view.page + " of " + pages + ")" : "no case matches";
    $("prev").disabled = view.page <= 1;
    $("next").disabled = view.page >= pages;
    drawTrend($("room").value);
    writeHash();
  }

  var SVG = "http://www.w3.org/2000/svg";
  function svg(tag, attrs, parent) {
    var el = document.createElementNS(SVG, tag);
    Object.keys(attrs).forEach(function (k) { el.setAttribute(k, attrs[k]); });
    parent.appendChild(el);
    return el;
  }
  function chart(series) {
    var W = 460, H = 180, L = 36, R = 8, T = 8, B = 20;
    var rates = series.points.map(function (p) { return p[1]; }).filter(function (r) { return r !== null; });
    var low = Math.min(85, Math.floor(Math.min.apply(null, rates.concat([100])) / 5) * 5);
    var x = function (i) { return L + (series.points.length > 1 ? i * (W - L - R) / (series.points.length - 1) : 0); };
    var y = function (r) { return T + (100 - r) * (H - T - B) / (100 - low); };
    var box = document.createElement("div"); box.className = "trend";
    var title = document.createElement("p"); title.textContent = series.stratum; box.appendChild(title);
    var root = svg("svg", {width: W, height: H, viewBox: "0 0 " + W + " " + H, role: "img"}, box);
    svg("title", {}, root).textContent = series.stratum;
    [100, low].forEach(function (r) {
      svg("text", {x: 2, y: y(r) + 4, "font-size": 10}, root).textContent = r + " %";
    });
    svg("line", {x1: L, x2: W - R, y1: y(95), y2: y(95), stroke: "green", "stroke-dasharray": "2 3"}, root);
    svg("line", {x1: L, x2: W - R, y1: y(90), y2: y(90), stroke: "red", "stroke-dasharray": "2 3"}, root);
    if (series.limits && series.limits.lower >= low) {  // below the axis: not drawn, not faked
      var lo = series.limits.lower;
      svg("line", {x1: L, x2: W - R, y1: y(lo), y2: y(lo), stroke: "black", "stroke-dasharray": "6 4",
        "class": "limit"}, root);
    }
    var line = series.points.filter(function (p) { return p[1] !== null; })
      .map(function (p, i) { return x(i) + "," + y(p[1]); }).join(" ");
    svg("polyline", {points: line, fill: "none", stroke: "#1f77b4"}, root);
    series.points.forEach(function (p, i) {
      if (p[1] === null) { return; }
      var dot = svg("circle", {cx: x(i), cy: y(Math.max(low, p[1])), r: p[2] ? 4 : 2.5,
        fill: p[2] ? "red" : "#1f77b4", "class": p[2] ? "out" : "point"}, root);
      svg("title", {}, dot).textContent = p[0] + ": " + p[1].toFixed(1) + " %";
    });
    var note = document.createElement("p"); note.className = "muted";
    note.textContent = series.points.length + " of " + series.beams_in_history + " beams" +
      (series.note ? "; " + series.note : "");
    box.appendChild(note);
    return box;
  }
  function drawTrend(room) {
    var target = $("trend"), rooms = {};
    target.innerHTML = "";
    data.trend.forEach(function (s) {
      if (!room || s.room === room) { (rooms[s.room] = rooms[s.room] || []).push(s); }
    });
    var names = Object.keys(rooms).sort();
    if (!names.length) { target.textContent = "no QA trend yet (results/qa_trend.json)"; return; }
    names.forEach(function (name) {
      var section = document.createElement("section"); section.className = "room-trend";
      section.setAttribute("data-room", name);
      var h = document.createElement("h3"); h.textContent = "room " + name; section.appendChild(h);
      rooms[name].forEach(function (s) { section.appendChild(chart(s)); });
      target.appendChild(section);
    });
  }

  readHash();
  fields.concat(["unsigned"]).forEach(function (f) {
    $(f).addEventListener("input", function () { view.page = 1; render(); });
  });
  $("prev").addEventListener("click", function () { view.page -= 1; render(); });
  $("next").addEventListener("click", function () { view.page += 1; render(); });
  window.addEventListener("hashchange", function () { readHash(); render(); });
  render();
  $("render-ms").textContent = performance.now().toFixed(1);
})();
</script>
</body>
</html>
"""
