// testbus dashboard: pages are rendered by the server; this keeps them
// live. A page's <main data-live=URL> is refreshed in place when the
// server-sent events at URL say something it shows changed; a log page
// appends lines as they are printed and filters them as you type.
"use strict";

function setState(text) {
  const s = document.getElementById("live-state");
  if (s) s.textContent = text;
}

function livePage(main) {
  let busy = false, again = false;
  async function refresh() {
    if (busy) { again = true; return; }
    busy = true;
    try {
      const r = await fetch(location.href, { headers: { "x-testbus-fragment": "main" }, cache: "no-store" });
      if (r.ok) {
        main.innerHTML = await r.text();
        main.dataset.refreshed = String(Number(main.dataset.refreshed || 0) + 1);
      }
    } finally {
      busy = false;
      if (again) { again = false; refresh(); }
    }
  }
  const es = new EventSource(main.dataset.live);
  es.addEventListener("open", () => { setState("live"); refresh(); });
  es.addEventListener("change", refresh);
  es.addEventListener("error", () => setState("reconnecting…"));
}

function logPage(pre) {
  const search = document.getElementById("log-search");
  const count = document.getElementById("log-count");
  const end = document.getElementById("log-end");
  let query = "";
  function matcher(q) {
    const m = /^\/(.*)\/$/.exec(q);
    if (m) {
      try { const re = new RegExp(m[1]); return (t) => re.test(t); } catch (e) { return () => false; }
    }
    return (t) => t.includes(q);
  }
  function apply() {
    const match = matcher(query);
    let shown = 0;
    for (const line of pre.children) {
      const ok = query === "" || match(line.textContent);
      line.hidden = !ok;
      if (ok) shown++;
    }
    count.textContent = query === "" ? "" : shown + " of " + pre.children.length + " lines";
  }
  search.addEventListener("input", () => { query = search.value; apply(); });
  const times = document.getElementById("log-times");
  times.addEventListener("change", () => pre.classList.toggle("times", times.checked));
  const es = new EventSource(pre.dataset.stream);
  // The server sends the whole output from its start on each connection:
  // a reconnection starts the page afresh.
  es.addEventListener("open", () => { pre.replaceChildren(); apply(); setState("live"); });
  es.onmessage = (e) => {
    const l = JSON.parse(e.data);
    const div = document.createElement("div");
    div.className = l.stderr ? "line stderr" : "line";
    // When the server received it (ms since the epoch; 0: not known).
    const t = Number(l.time) || 0;
    div.dataset.time = String(t);
    const ts = document.createElement("span");
    ts.className = "ts";
    ts.textContent = t ? new Date(t).toISOString().slice(11, 23) : "--:--:--.---";
    if (t) ts.title = new Date(t).toISOString();
    const from = document.createElement("span");
    from.className = "from";
    from.textContent = l.from;
    div.append(ts, from, document.createTextNode(l.text));
    if (query !== "") div.hidden = !matcher(query)(div.textContent);
    const follow = window.innerHeight + window.scrollY >= document.body.scrollHeight - 40;
    // In time order across processes: streams arrive interleaved, so a
    // line goes after the last one received no later than it (lines of
    // one time keep the order they came in).
    let after = pre.lastElementChild;
    while (after && Number(after.dataset.time) > t) after = after.previousElementSibling;
    if (after) after.after(div); else pre.prepend(div);
    if (query !== "") apply();
    if (follow) window.scrollTo(0, document.body.scrollHeight);
  };
  es.addEventListener("end", (e) => {
    end.textContent = "End of output: " + e.data + ".";
    end.dataset.ended = "true";
    setState("");
    es.close();
  });
  es.addEventListener("error", () => { if (!end.dataset.ended) setState("reconnecting…"); });
}

document.addEventListener("DOMContentLoaded", () => {
  const main = document.querySelector("main[data-live]");
  if (main) livePage(main);
  const pre = document.getElementById("log");
  if (pre) logPage(pre);
});
