"""The page served at `/`: one self-contained HTML file (inline script and style, nothing fetched from
elsewhere). It uploads an image once with every offered method, then draws the model's input with the
chosen method's heatmap on a canvas; the method selector and the opacity slider redraw without a request.
Server text reaches the page only through `textContent`, never as HTML."""

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>xraylens - explain a radiograph</title>
<style>
  :root { --bg: #101418; --panel: #1a2027; --text: #e6e9ec; --muted: #93a1ad; --accent: #4fb3ff; --bad: #ff7b72; }
  * { box-sizing: border-box; }
  body { margin: 0; font: 15px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; background: var(--bg);
         color: var(--text); }
  header { padding: 14px 24px; border-bottom: 1px solid #2a323b; display: flex; gap: 18px; align-items: baseline;
           flex-wrap: wrap; }
  header h1 { font-size: 18px; margin: 0; font-weight: 600; }
  #modelinfo { color: var(--muted); font-size: 13px; }
  main { display: flex; gap: 24px; padding: 20px 24px; flex-wrap: wrap; align-items: flex-start; }
  #stage { position: relative; width: 512px; max-width: 100%; }
  #drop { width: 512px; max-width: 100%; aspect-ratio: 1; border: 2px dashed #3a4550; border-radius: 10px;
          display: flex; align-items: center; justify-content: center; text-align: center; color: var(--muted);
          cursor: pointer; padding: 24px; background: #0c0f12; }
  #drop.over { border-color: var(--accent); color: var(--text); }
  #drop.has { display: none; }
  #view { display: none; width: 512px; max-width: 100%; border-radius: 10px; background: #000; cursor: pointer; }
  #view.has { display: block; }
  aside { flex: 1; min-width: 300px; max-width: 460px; display: flex; flex-direction: column; gap: 16px; }
  .card { background: var(--panel); border-radius: 10px; padding: 14px 16px; }
  .card h2 { font-size: 12px; text-transform: uppercase; letter-spacing: .06em; color: var(--muted); margin: 0 0 10px;
             font-weight: 600; }
  label { display: block; color: var(--muted); font-size: 13px; margin: 8px 0 4px; }
  select, input[type=password] { width: 100%; padding: 7px 8px; border-radius: 6px; border: 1px solid #3a4550;
                                 background: #0f1317; color: var(--text); font-size: 14px; }
  input[type=range] { width: 100%; }
  .row { display: grid; grid-template-columns: minmax(90px, auto) 1fr 58px; gap: 10px; align-items: center;
         margin: 6px 0; font-size: 14px; }
  .bar { height: 10px; background: #0f1317; border-radius: 5px; overflow: hidden; }
  .bar > div { height: 100%; background: #5d6b78; }
  .row.top { font-weight: 600; }
  .row.top .bar > div { background: var(--accent); }
  .num { text-align: right; font-variant-numeric: tabular-nums; }
  #verdict { font-size: 20px; font-weight: 600; margin-bottom: 6px; }
  #status { font-size: 13px; color: var(--muted); min-height: 1.4em; }
  #status.error { color: var(--bad); }
  .small { font-size: 12px; color: var(--muted); }
  button { background: #24303b; color: var(--text); border: 1px solid #3a4550; border-radius: 6px; padding: 6px 12px;
           cursor: pointer; font-size: 13px; }
</style>
</head>
<body data-state="empty">
<header>
  <h1>xraylens</h1>
  <span id="modelinfo">loading the model...</span>
</header>
<main>
  <div id="stage">
    <div id="drop" tabindex="0">Drop a radiograph here, or click to choose one<br>(PNG, JPEG or DICOM)</div>
    <canvas id="view" width="512" height="512" title="Click to choose another image"></canvas>
    <input id="file" type="file" accept=".png,.jpg,.jpeg,.dcm,.dicom,image/png,image/jpeg,application/dicom" hidden>
    <p class="small" id="caption"></p>
  </div>
  <aside>
    <div class="card" id="auth" hidden>
      <h2>Access token</h2>
      <input id="token" type="password" placeholder="paste the server's token" autocomplete="off">
      <p class="small">This server needs its bearer token for the model and predictions. It stays in this tab.</p>
    </div>
    <div class="card">
      <h2>Prediction</h2>
      <div id="verdict">-</div>
      <div id="probs"></div>
    </div>
    <div class="card">
      <h2>Explanation</h2>
      <label for="method">CAM method</label>
      <select id="method"></select>
      <div class="small" id="methodinfo"></div>
      <label for="opacity">Heatmap opacity <span id="opacityval">45%</span></label>
      <input id="opacity" type="range" min="0" max="100" value="45">
      <p class="small" id="peak"></p>
      <button id="choose" type="button">Choose another image</button>
    </div>
    <div id="status" role="status"></div>
  </aside>
</main>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
let model = null;
let result = null;
let base = null;
let heat = {};

function setStatus(text, error) {
  $("status").textContent = text;
  $("status").className = error ? "error" : "";
}

async function api(path, options) {
  const opts = Object.assign({}, options || {});
  opts.headers = Object.assign({}, opts.headers || {});
  const token = $("token").value.trim();  // read at each call: a pasted token works at once
  if (token) opts.headers["Authorization"] = "Bearer " + token;
  const response = await fetch(path, opts);
  let body = null;
  try { body = await response.json(); } catch (e) { body = null; }
  if (!response.ok) {
    const detail = body && typeof body.detail === "string" ? body.detail : response.status + " " + response.statusText;
    const err = new Error(detail);
    err.status = response.status;
    throw err;
  }
  return body;
}

async function loadModel() {
  try {
    model = await api("/model");
  } catch (e) {
    $("modelinfo").textContent = e.status === 401 ? "paste the access token to load the model" : e.message;
    setStatus(e.message, true);
    return;
  }
  $("modelinfo").textContent = model.architecture + " \u00b7 input " + model.input_size.join("\u00d7") +
    " px \u00b7 classes: " + model.classes.join(", ") + " \u00b7 run " + model.run;
  const select = $("method");
  select.textContent = "";
  for (const m of model.cam_methods) {
    const option = document.createElement("option");
    option.value = m.name;
    option.textContent = m.name;
    option.title = m.summary;
    select.appendChild(option);
  }
  select.value = model.default_methods[0] || model.cam_methods[0].name;
  describeMethod();
  setStatus("ready: drop an image");
}

function describeMethod() {
  const m = model && model.cam_methods.find((x) => x.name === $("method").value);
  $("methodinfo").textContent = m ? m.summary : "";
}

function loadImage(b64) {
  return new Promise((resolve, reject) => {
    const img = new Image();
    img.onload = () => resolve(img);
    img.onerror = () => reject(new Error("the server sent an unreadable image"));
    img.src = "data:image/png;base64," + b64;
  });
}

function jet(v) {
  const c = (x) => Math.max(0, Math.min(1, x));
  return [c(1.5 - Math.abs(4 * v - 3)), c(1.5 - Math.abs(4 * v - 2)), c(1.5 - Math.abs(4 * v - 1))];
}
const JET = Array.from({ length: 256 }, (_, i) => jet(i / 255).map((x) => Math.round(x * 255)));

async function colorize(b64, w, h) {
  const img = await loadImage(b64);
  const canvas = document.createElement("canvas");
  canvas.width = w;
  canvas.height = h;
  const ctx = canvas.getContext("2d");
  ctx.drawImage(img, 0, 0);
  const data = ctx.getImageData(0, 0, w, h);
  const px = data.data;
  for (let i = 0; i < px.length; i += 4) {
    const rgb = JET[px[i]];
    px[i] = rgb[0]; px[i + 1] = rgb[1]; px[i + 2] = rgb[2]; px[i + 3] = 255;
  }
  ctx.putImageData(data, 0, 0);
  return canvas;
}

function fmtPct(p) { return (100 * p).toFixed(1) + "%"; }

function showProbabilities(r) {
  $("verdict").textContent = r.class + " (" + fmtPct(r.probability) + ")";
  const box = $("probs");
  box.textContent = "";
  const entries = Object.entries(r.probabilities).sort((a, b) => b[1] - a[1]);
  for (const [name, p] of entries) {
    const row = document.createElement("div");
    row.className = "row" + (name === r.class ? " top" : "");
    const label = document.createElement("span");
    label.textContent = name;
    const bar = document.createElement("div");
    bar.className = "bar";
    const fill = document.createElement("div");
    fill.style.width = (100 * p).toFixed(1) + "%";
    bar.appendChild(fill);
    const num = document.createElement("span");
    num.className = "num";
    num.textContent = fmtPct(p);
    row.append(label, bar, num);
    box.appendChild(row);
  }
}

function draw() {
  if (!result || !base) return;
  const canvas = $("view");
  const w = result.input.width, h = result.input.height;
  canvas.width = 512;
  canvas.height = Math.round(512 * h / w);
  const ctx = canvas.getContext("2d");
  ctx.imageSmoothingEnabled = true;
  ctx.globalAlpha = 1;
  ctx.drawImage(base, 0, 0, canvas.width, canvas.height);
  const method = $("method").value;
  const alpha = Number($("opacity").value) / 100;
  $("opacityval").textContent = Math.round(alpha * 100) + "%";
  const cam = result.cams[method];
  if (heat[method] && cam) {
    ctx.globalAlpha = alpha;
    ctx.drawImage(heat[method], 0, 0, canvas.width, canvas.height);
    ctx.globalAlpha = 1;
    if (cam.peak) {
      const x = cam.peak.input[0] * canvas.width / w, y = cam.peak.input[1] * canvas.height / h;
      ctx.lineWidth = 2;
      ctx.strokeStyle = "#000";
      ctx.beginPath(); ctx.arc(x, y, 9, 0, 2 * Math.PI); ctx.stroke();
      ctx.strokeStyle = "#fff";
      ctx.beginPath(); ctx.arc(x, y, 7, 0, 2 * Math.PI); ctx.stroke();
      $("peak").textContent = "Peak (circled) at x = " + cam.peak.original[0].toFixed(0) + ", y = " +
        cam.peak.original[1].toFixed(0) + " in the uploaded image's pixels.";
    } else {
      $("peak").textContent = "This map is constant: no peak.";
    }
  }
  canvas.dataset.method = method;
  canvas.dataset.opacity = String(alpha);
}

async function predict(file) {
  if (!model) { await loadModel(); if (!model) return; }
  document.body.dataset.state = "busy";
  setStatus("explaining " + file.name + "...");
  const form = new FormData();
  form.append("file", file);
  const methods = model.cam_methods.map((m) => m.name).join(",");
  const t0 = performance.now();
  let r;
  try {
    r = await api("/predict?methods=" + encodeURIComponent(methods), { method: "POST", body: form });
  } catch (e) {
    document.body.dataset.state = "error";
    setStatus(file.name + ": " + e.message, true);
    return;
  }
  const img = await loadImage(r.input.png);
  const maps = {};
  for (const [m, cam] of Object.entries(r.cams)) maps[m] = await colorize(cam.png, r.input.width, r.input.height);
  result = r; base = img; heat = maps;
  $("drop").classList.add("has");
  $("view").classList.add("has");
  $("caption").textContent = file.name + ": " + r.image.width + "\u00d7" + r.image.height + " " +
    r.image.format.toUpperCase() + "; shown as the model saw it (" + r.input.width + "\u00d7" + r.input.height +
    " px). The CAMs explain " + r.explained_class + ".";
  showProbabilities(r);
  draw();
  document.body.dataset.state = "ready";
  setStatus("explained in " + Math.round(performance.now() - t0) + " ms (server " + r.timing_ms.total.toFixed(0) +
    " ms)");
}

function choose() { $("file").click(); }
$("drop").addEventListener("click", choose);
$("drop").addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") choose(); });
$("view").addEventListener("click", choose);
$("choose").addEventListener("click", choose);
$("file").addEventListener("change", () => {
  const file = $("file").files[0];
  $("file").value = "";  // so choosing the same file again (after an error, say) still fires change
  if (file) predict(file);
});
for (const target of [$("drop"), $("view")]) {
  target.addEventListener("dragover", (e) => { e.preventDefault(); $("drop").classList.add("over"); });
  target.addEventListener("dragleave", () => $("drop").classList.remove("over"));
  target.addEventListener("drop", (e) => {
    e.preventDefault();
    $("drop").classList.remove("over");
    if (e.dataTransfer.files.length) predict(e.dataTransfer.files[0]);
  });
}
$("method").addEventListener("change", () => { describeMethod(); draw(); });
$("opacity").addEventListener("input", draw);
$("token").addEventListener("change", loadModel);

(async () => {
  try {
    const health = await api("/health");
    $("auth").hidden = !health.auth;
    if (health.auth) { $("modelinfo").textContent = "paste the access token to load the model"; return; }
  } catch (e) {
    setStatus("server unreachable: " + e.message, true);
    return;
  }
  await loadModel();
})();
</script>
</body>
</html>
"""
