"""The job server's page (``GET /``): a table of the jobs with status, a progress bar, the top
preview as a thumbnail and links to the artifacts, refreshed every two seconds. The page holds
no data itself: its script calls the API with the bearer token taken from ``?token=`` (or the
one saved in the browser), and fetches thumbnails and downloads with that header."""

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>splatforge jobs</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
 body { font: 14px/1.4 system-ui, sans-serif; margin: 24px; color: #222; background: #fafafa; }
 h1 { font-size: 20px; margin: 0 0 12px; }
 table { border-collapse: collapse; width: 100%; background: #fff; }
 th, td { text-align: left; padding: 8px 10px; border-bottom: 1px solid #e3e3e3; vertical-align: middle; }
 th { background: #f0f0f0; font-weight: 600; }
 .bar { width: 180px; height: 12px; background: #e6e6e6; border-radius: 6px; overflow: hidden; \
display: inline-block; vertical-align: middle; }
 .bar > span { display: block; height: 100%; background: #3b82f6; }
 .succeeded .bar > span { background: #16a34a; } .failed .bar > span { background: #dc2626; }
 .cancelled .bar > span { background: #9ca3af; }
 .status { font-weight: 600; } .succeeded .status { color: #16a34a; } .failed .status { color: #dc2626; }
 .cancelled .status { color: #6b7280; } .running .status { color: #2563eb; }
 img.thumb { width: 72px; height: 72px; object-fit: cover; border-radius: 4px; background: #ddd; }
 a { color: #2563eb; margin-right: 10px; cursor: pointer; display: inline-block; }
 td.links { max-width: 420px; } .muted { color: #888; } .err { color: #dc2626; font-size: 12px; }
</style></head>
<body>
<h1>splatforge jobs</h1>
<p class="muted" id="summary">loading...</p>
<table><thead><tr><th>preview</th><th>job</th><th>status</th><th>progress</th><th>created</th>\
<th>artifacts</th></tr></thead>
<tbody id="jobs"></tbody></table>
<script>
const params = new URLSearchParams(location.search);
if (params.get("token")) localStorage.setItem("splatforge-token", params.get("token"));
const token = params.get("token") || localStorage.getItem("splatforge-token") || "";
const headers = token ? {"Authorization": "Bearer " + token} : {};
const thumbs = {};
function el(tag, attrs, text) { const e = document.createElement(tag); Object.assign(e, attrs || {}); \
if (text !== undefined) e.textContent = text; return e; }
async function blobUrl(url) { const r = await fetch(url, {headers}); if (!r.ok) throw new Error(r.status); \
return URL.createObjectURL(await r.blob()); }
async function download(a) { const u = await blobUrl(a.url); \
const link = el("a", {href: u, download: a.name}); document.body.appendChild(link); link.click(); \
link.remove(); }
function row(job) {
  const tr = el("tr", {className: job.status, id: "job-" + job.id});
  const img = el("img", {className: "thumb", alt: "preview"});
  const top = job.artifacts.find(a => a.data_type === "splat_preview_top");
  if (top) { if (!thumbs[job.id]) thumbs[job.id] = blobUrl(top.url); \
thumbs[job.id].then(u => img.src = u).catch(() => {}); }
  const p = job.progress || {};
  const pct = job.status === "succeeded" ? 100 : (p.pct || 0);
  const bar = el("span"); bar.style.width = pct + "%";
  const barWrap = el("div", {className: "bar"}); barWrap.appendChild(bar);
  const prog = el("td"); prog.appendChild(barWrap);
  prog.appendChild(el("span", {className: "muted"}, \
" " + Math.round(pct) + "% " + (p.stage || "") + (p.step ? " step " + p.step + "/" + p.steps : "")));
  const links = el("td", {className: "links"});
  for (const a of job.artifacts) { const l = el("a", {title: a.bytes + " bytes"}, a.name); \
l.onclick = () => download(a); links.appendChild(l); }
  const status = el("td"); status.appendChild(el("span", {className: "status"}, job.status));
  if (job.error) status.appendChild(el("div", {className: "err"}, job.error));
  const cells = [el("td"), el("td", {}, job.id + " (" + job.kind + ")"), status, prog, el("td", {}, \
new Date(job.created_ms).toLocaleString()), links];
  cells[0].appendChild(img);
  for (const c of cells) tr.appendChild(c);
  return tr;
}
async function refresh() {
  try {
    const r = await fetch("/api/jobs", {headers});
    if (r.status === 401) { document.getElementById("summary").textContent = "unauthorised: open this page \
with ?token=YOUR_TOKEN"; return; }
    const data = await r.json();
    const body = document.getElementById("jobs");
    body.replaceChildren(...data.jobs.map(row));
    const n = s => data.jobs.filter(j => j.status === s).length;
    document.getElementById("summary").textContent = data.jobs.length + " jobs: " + n("queued") + " queued, \
" + n("running") + " running, " +
      n("succeeded") + " succeeded, " + n("failed") + " failed, " + n("cancelled") + " cancelled";
  } catch (e) { document.getElementById("summary").textContent = "cannot reach the server: " + e; }
}
refresh(); setInterval(refresh, 2000);
</script></body></html>
"""
