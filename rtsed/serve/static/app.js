// The live page: microphone -> AudioWorklet -> WebSocket /ws -> events and display frames back.
//
// Audio is captured at the AudioContext's own rate (often 44.1 or 48 kHz) and sent as mono f32le
// in 20 ms messages; the server resamples to the model's rate. The log-mel spectrogram is the
// server's: the very frames the model sees (its mel bands, its rate, its window), quantised to
// 0-255, so the page computes no FFT and shows what the detector hears, not an approximation.
//
// With ?watch=ID the page captures nothing: it shows stream ID (one the server pulls from a URL,
// another browser's) from the read-only socket /watch/ID, from the moment it connects.

const WINDOW_S = 10;  // seconds of history shown
const $ = (s) => document.querySelector(s);
const params = new URLSearchParams(location.search);
const state = {
  ready: null, ws: null, ctx: null, stream: null, node: null,
  probs: [], probsT0: 0, mel: [], melT0: 0, level: -120, now: 0,
  events: [], open: new Map(), closed: null,
  sent: params.get("record") ? [] : null,  // ?record=1: keep every block sent (tests compare with rtsed.detect)
};
window.rtsed = state;  // for tests and the curious

// The audio sent so far as base64 of its f32le bytes (with ?record=1).
state.sentBase64 = () => {
  const all = new Float32Array(state.sent.reduce((n, b) => n + b.length, 0));
  let at = 0;
  for (const b of state.sent) { all.set(b, at); at += b.length; }
  const bytes = new Uint8Array(all.buffer);
  let text = "";
  for (let i = 0; i < bytes.length; i += 0x8000) text += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  return btoa(text);
};

function setStatus(text, cls = "") { $("#status").textContent = text; $("#status").className = cls; }

async function start() {
  $("#start").disabled = true;
  try {
    state.stream = await navigator.mediaDevices.getUserMedia({
      // The detector wants the room as it sounds: no echo cancelling, noise suppression or gain riding.
      audio: { echoCancellation: false, noiseSuppression: false, autoGainControl: false, channelCount: 1 },
    });
    state.ctx = new AudioContext();
    await state.ctx.audioWorklet.addModule("/static/worklet.js");
  } catch (err) {
    setStatus(`microphone unavailable: ${err.message || err}; allow microphone access and reload`, "bad");
    $("#start").disabled = false;
    return;
  }
  const rate = state.ctx.sampleRate;
  state.contextRate = rate;
  const ws = new WebSocket(`${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/ws`);
  ws.binaryType = "arraybuffer";
  state.ws = ws;
  ws.onopen = () => {
    ws.send(JSON.stringify({ sample_rate: rate, channels: 1, format: "f32le", name: params.get("name") || "browser" }));
    const source = state.ctx.createMediaStreamSource(state.stream);
    state.node = new AudioWorkletNode(state.ctx, "rtsed-capture");
    const block = Math.round(rate * 0.02);  // 20 ms per message
    let pending = new Float32Array(block), filled = 0;
    state.node.port.onmessage = ({ data }) => {
      let offset = 0;
      while (offset < data.length) {
        const n = Math.min(block - filled, data.length - offset);
        pending.set(data.subarray(offset, offset + n), filled);
        filled += n; offset += n;
        if (filled === block) {
          if (state.sent) state.sent.push(pending);
          if (ws.readyState === WebSocket.OPEN) ws.send(pending.buffer);
          pending = new Float32Array(block); filled = 0;
        }
      }
    };
    source.connect(state.node);
    $("#stop").disabled = false;
    setStatus(`streaming at ${rate} Hz`, "ok");
  };
  ws.onmessage = ({ data }) => handle(JSON.parse(data));
  ws.onclose = (e) => {
    state.closed = { code: e.code, reason: e.reason };
    setStatus(`closed (${e.code}) ${e.reason}`, e.code === 1000 || e.code === 1001 ? "" : "bad");
    stopAudio();
    $("#stop").disabled = true;
    $("#start").disabled = false;
  };
}

function watch(id) {
  $("#start").hidden = $("#stop").hidden = true;
  const ws = new WebSocket(`${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/watch/${id}`);
  state.ws = ws;
  setStatus(`watching stream ${id}`, "ok");
  ws.onmessage = ({ data }) => handle(JSON.parse(data));
  ws.onclose = (e) => {
    state.closed = { code: e.code, reason: e.reason };
    setStatus(`closed (${e.code}) ${e.reason}`, e.code === 1000 ? "" : "bad");
  };
}

function stopAudio() {
  if (state.node) state.node.disconnect();
  if (state.stream) state.stream.getTracks().forEach((t) => t.stop());
  if (state.ctx && state.ctx.state !== "closed") state.ctx.close();
  state.node = state.stream = state.ctx = null;
}

function stop() {
  // The server closes the stream's open events, sends them, then closes the socket.
  if (state.ws && state.ws.readyState === WebSocket.OPEN) state.ws.send(JSON.stringify({ type: "end" }));
  stopAudio();
  $("#stop").disabled = true;
  setStatus("ending: waiting for the last events", "");
}

function handle(m) {
  if (m.type === "ready") {
    state.ready = m;
    $("#info").innerHTML = "";
    const lines = [`stream ${m.stream} (${m.name})`, ...(m.watching ? [`watching: ${m.source}`] : []),
      `model ${m.model}: ${m.labels.length} classes`,
      `model rate ${m.model_rate} Hz, hop ${m.hop_s * 1000} ms`, `lookahead ${m.lookahead_s} s`];
    for (const l of lines) { const d = document.createElement("div"); d.textContent = l; $("#info").append(d); }
  } else if (m.type === "frames") {
    if (!state.probs.length) state.probsT0 = m.t_s;
    if (!state.mel.length) state.melT0 = m.mel_t_s;
    state.probs.push(...m.probs);
    state.mel.push(...m.mel);
    trim();
    state.level = m.level_dbfs;
    state.now = Math.max(state.now, m.mel_t_s + m.mel.length * state.ready.hop_s);
  } else if (m.type === "onset") {
    state.open.set(m.label, m);
    renderEvents();
  } else if (m.type === "event") {
    state.open.delete(m.label);
    state.events.push(m);
    renderEvents();
  } else if (m.type === "error" || m.type === "warning") {
    setStatus(m.message, m.type === "error" ? "bad" : "warn");
  } else if (m.type === "end") {
    for (const [label] of state.open) state.open.delete(label);
    renderEvents();
  }
}

function trim() {
  const keep = Math.round(WINDOW_S / state.ready.hop_s);
  if (state.probs.length > keep) { const d = state.probs.length - keep; state.probs.splice(0, d); state.probsT0 += d * state.ready.hop_s; }
  if (state.mel.length > keep) { const d = state.mel.length - keep; state.mel.splice(0, d); state.melT0 += d * state.ready.hop_s; }
}

function renderEvents() {
  const body = $("#events tbody");
  const rows = [];
  for (const m of state.open.values()) rows.push([m, true]);
  for (const e of [...state.events].reverse()) rows.push([e, false]);
  body.replaceChildren(...rows.map(([e, open]) => {
    const tr = document.createElement("tr");
    tr.className = open ? "open" : "event";
    tr.dataset.label = e.label; tr.dataset.onset = e.onset_s;
    if (!open) tr.dataset.offset = e.offset_s;
    for (const v of [e.label, e.onset_s.toFixed(2), open ? "..." : e.offset_s.toFixed(2), (e.score ?? 0).toFixed(2)]) {
      const td = document.createElement("td"); td.textContent = v; tr.append(td);
    }
    return tr;
  }));
}

// ------------------------------------------------------------------ drawing
const COLORS = ["#58a6ff", "#3fb950", "#d29922", "#f85149", "#bc8cff", "#39c5cf", "#ff7b72", "#e3b341", "#7ee787", "#a5d6ff",
  "#ffa657", "#d2a8ff", "#79c0ff", "#56d364", "#f778ba", "#c9d1d9"];
const color = (c) => COLORS[c % COLORS.length];

function magma(v) {  // 0..255 -> an [r, g, b] dark-to-bright ramp
  const t = v / 255;
  return [Math.min(255, 40 + 400 * t * t), Math.max(0, Math.min(255, 350 * (t - 0.35))), Math.max(0, 120 * Math.sin(Math.PI * t) + 60 * t)];
}

function drawSpectrogram() {
  const cv = $("#spectrogram"), g = cv.getContext("2d");
  g.fillStyle = "#0b0f13"; g.fillRect(0, 0, cv.width, cv.height);
  if (!state.ready || !state.mel.length) return;
  const cols = Math.round(WINDOW_S / state.ready.hop_s), bands = state.ready.n_mels;
  const img = g.createImageData(cols, bands);
  const start = cols - state.mel.length;
  state.mel.forEach((row, i) => row.forEach((v, b) => {
    const [r, gg, bb] = magma(v), p = ((bands - 1 - b) * cols + start + i) * 4;
    img.data[p] = r; img.data[p + 1] = gg; img.data[p + 2] = bb; img.data[p + 3] = 255;
  }));
  createImageBitmap(img).then((bmp) => { g.imageSmoothingEnabled = false; g.drawImage(bmp, 0, 0, cv.width, cv.height); });
}

function xOf(t, cv) { return cv.width * (1 - (state.now - t) / WINDOW_S); }

function drawLanes() {
  const cv = $("#lanes"), g = cv.getContext("2d");
  g.fillStyle = "#0b0f13"; g.fillRect(0, 0, cv.width, cv.height);
  if (!state.ready) return;
  const { labels, on, off, hop_s } = state.ready, h = cv.height / labels.length;
  labels.forEach((label, c) => {
    const top = c * h, y = (p) => top + h - 3 - p * (h - 6);
    g.strokeStyle = "#26303a"; g.beginPath(); g.moveTo(0, top + h); g.lineTo(cv.width, top + h); g.stroke();
    g.strokeStyle = color(c); g.globalAlpha = 0.8; g.setLineDash([]);
    g.beginPath(); g.moveTo(0, y(on[c])); g.lineTo(cv.width, y(on[c])); g.stroke();
    g.setLineDash([4, 4]); g.beginPath(); g.moveTo(0, y(off[c])); g.lineTo(cv.width, y(off[c])); g.stroke();
    g.setLineDash([]); g.globalAlpha = 1; g.lineWidth = 1.5; g.beginPath();
    state.probs.forEach((row, i) => { const x = xOf(state.probsT0 + i * hop_s, cv); i ? g.lineTo(x, y(row[c])) : g.moveTo(x, y(row[c])); });
    g.stroke(); g.lineWidth = 1;
    const latest = state.probs.length ? state.probs[state.probs.length - 1][c] : 0;
    g.fillStyle = latest >= on[c] ? "#3fb950" : "#8b98a5"; g.font = "12px system-ui";
    g.fillText(`${label} ${latest.toFixed(2)}`, 6, top + 14);
  });
}

function drawRoll() {
  const cv = $("#roll"), g = cv.getContext("2d");
  g.fillStyle = "#0b0f13"; g.fillRect(0, 0, cv.width, cv.height);
  if (!state.ready) return;
  const labels = state.ready.labels, h = cv.height / labels.length;
  labels.forEach((label, c) => { g.fillStyle = "#8b98a5"; g.font = "11px system-ui"; g.fillText(label, 4, c * h + h - 4); });
  const bar = (e, end, alpha) => {
    const c = labels.indexOf(e.label), x0 = Math.max(0, xOf(e.onset_s, cv)), x1 = xOf(end, cv);
    if (x1 < 0) return;
    g.globalAlpha = alpha; g.fillStyle = color(c); g.fillRect(x0, c * h + 2, Math.max(2, x1 - x0), h - 4); g.globalAlpha = 1;
  };
  state.events.forEach((e) => bar(e, e.offset_s, 0.85));
  state.open.forEach((e) => bar(e, state.now, 0.45));
}

function drawMeter() {
  const cv = $("#meter"), g = cv.getContext("2d");
  g.fillStyle = "#0b0f13"; g.fillRect(0, 0, cv.width, cv.height);
  const frac = Math.max(0, Math.min(1, (state.level + 80) / 80));  // -80..0 dBFS
  g.fillStyle = state.level > -6 ? "#f85149" : state.level > -20 ? "#d29922" : "#3fb950";
  g.fillRect(0, 0, cv.width * frac, cv.height);
  g.fillStyle = "#e6edf3"; g.font = "11px system-ui"; g.fillText(`${state.level.toFixed(1)} dBFS`, 6, 11);
}

function frame() { drawMeter(); drawSpectrogram(); drawLanes(); drawRoll(); requestAnimationFrame(frame); }

$("#start").onclick = start;
$("#stop").onclick = stop;
requestAnimationFrame(frame);
if (params.get("watch")) watch(params.get("watch"));
else if (params.get("autostart")) start();
