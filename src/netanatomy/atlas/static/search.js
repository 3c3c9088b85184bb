/* Search box of the netanatomy atlas: finds a layer, a unit ("conv1/5", "conv1:5", "conv1 5")
   or a cluster ("cluster 3") by name and goes to its page. The index is a global set by
   search-index.js (a plain script, so it loads from file:// too, where fetch() is refused). */
(function () {
  "use strict";
  var root = document.documentElement.getAttribute("data-root") || "";

  function layerNamed(index, name) {
    var exact = null, folded = [];
    index.layers.forEach(function (l) {
      if (l.name === name) { exact = l; }
      if (l.name.toLowerCase() === name.toLowerCase()) { folded.push(l); }
    });
    return exact || (folded.length === 1 ? folded[0] : null);
  }

  function hasPage(layer, unit) {
    return layer.pages === "all" ? unit < layer.units : layer.pages.indexOf(unit) >= 0;
  }

  /* Split "LAYER SEP N" at the rightmost separator whose left part names a layer. */
  function unitQuery(index, q) {
    var m = /^(.*?)[\s\/:#.\[]*(\d+)\]?$/.exec(q);
    for (var end = q.length - 1; end > 0; end--) {
      if (" /:#.[".indexOf(q.charAt(end)) < 0) { continue; }
      var rest = q.slice(end + 1).replace(/^[\s\/:#.\[]+/, "").replace(/\]$/, "");
      if (!/^\d+$/.test(rest)) { continue; }
      var layer = layerNamed(index, q.slice(0, end).replace(/[\s\/:#.\[]+$/, ""));
      if (layer) { return {layer: layer, unit: parseInt(rest, 10)}; }
    }
    return m ? {name: m[1].replace(/[\s\/:#.\[]+$/, ""), unit: parseInt(m[2], 10)} : null;
  }

  function similar(index, text) {
    var t = text.toLowerCase();
    return index.layers.filter(function (l) { return l.name.toLowerCase().indexOf(t) >= 0; }).slice(0, 12);
  }

  /* {href} to go to, or {message, links} to show. */
  function resolve(index, query) {
    var q = query.trim();
    if (!q) { return {message: "Type a layer name, a unit (conv1/5) or a cluster (cluster 3).", links: []}; }
    var layer = layerNamed(index, q);
    if (layer) { return {href: layer.url}; }
    var c = /^(?:cluster|c)\s*[\s:#\/]?\s*(-?\d+)$/i.exec(q);
    if (c) {
      var id = parseInt(c[1], 10);
      var found = index.clusters.filter(function (x) { return x.id === id; })[0];
      return found ? {href: found.url} : {message: "No cluster " + id + " in this atlas.", links: []};
    }
    var u = unitQuery(index, q);
    if (u && u.layer) {
      if (u.layer.units !== null && u.unit >= u.layer.units) {
        return {message: u.layer.name + " has " + u.layer.units + " units (0 to " + (u.layer.units - 1) + ").",
                links: [{label: u.layer.name, href: u.layer.url}]};
      }
      if (hasPage(u.layer, u.unit)) { return {href: u.layer.units_url + u.unit + ".html"}; }
      return {message: "The survey made no page for " + u.layer.name + " unit " + u.unit + ".",
              links: [{label: u.layer.name, href: u.layer.url}]};
    }
    var near = similar(index, q);
    if (!near.length && u) { near = similar(index, u.name); }
    return {message: near.length ? "No layer named \u201c" + q + "\u201d. Layers with a similar name:"
                                 : "No layer or unit named \u201c" + q + "\u201d.",
            links: near.map(function (l) { return {label: l.name, href: l.url}; })};
  }

  function show(box, result) {
    box.textContent = "";
    var p = document.createElement("p");
    p.textContent = result.message;
    box.appendChild(p);
    if (result.links.length) {
      var ul = document.createElement("ul");
      result.links.forEach(function (l) {
        var li = document.createElement("li"), a = document.createElement("a");
        a.href = root + l.href;
        a.textContent = l.label;
        li.appendChild(a);
        ul.appendChild(li);
      });
      box.appendChild(ul);
    }
  }

  function fillNames(index) {
    var list = document.getElementById("search-names");
    if (!list || index.layers.length > 2000) { return; }
    index.layers.forEach(function (l) {
      var o = document.createElement("option");
      o.value = l.name;
      list.appendChild(o);
    });
  }

  var form = document.getElementById("search");
  if (!form) { return; }
  var box = document.getElementById("search-results");
  var index = window.NETANATOMY_INDEX;
  if (index) { fillNames(index); }
  form.addEventListener("submit", function (event) {
    event.preventDefault();
    if (!window.NETANATOMY_INDEX) {
      show(box, {message: "The search index (assets/search-index.js) did not load.", links: []});
      return;
    }
    var result = resolve(window.NETANATOMY_INDEX, form.elements.q.value);
    if (result.href) { window.location.href = root + result.href; } else { show(box, result); }
  });
  window.netanatomySearch = {resolve: resolve};
})();
