// The grid page: every stream on the server and its health, from GET /streams and /health, once a second.
const $ = (s) => document.querySelector(s);
const cell = (v) => { const td = document.createElement("td"); td.textContent = v ?? ""; return td; };

function row(values, cls) {
  const tr = document.createElement("tr");
  values.forEach((v, i) => {
    let td;
    if (v instanceof Node) { td = document.createElement("td"); td.append(v); } else td = cell(v);
    if (cls && cls[i]) td.className = cls[i];
    tr.append(td);
  });
  return tr;
}

// A live stream's name links to the live page watching it (its lanes, spectrogram and events).
function watchLink(s) {
  const a = document.createElement("a");
  a.href = `/?watch=${s.id}`;
  a.textContent = s.name;
  a.className = "watch";
  return a;
}

// Where a stream comes from: a pulled URL (connected or reconnecting) or a client's audio format.
function input(s) {
  if (s.url) return `${s.url} (${s.connected ? "connected" : "connecting"}${s.reconnects ? `, ${s.reconnects} reconnects` : ""})`;
  return `${s.sample_rate} Hz ${s.channels} ch ${s.format}`;
}

async function refresh() {
  try {
    const [streams, health] = await Promise.all([fetch("/streams").then((r) => r.json()),
                                                 fetch("/health").then((r) => r.json())]);
    $("#summary").textContent = `${health.status}: ${health.model} (${health.backend}), ` +
      `${streams.streams.length} / ${streams.max_streams} streams, ${health.steps_per_s} steps/s`;
    $("#summary").className = health.status === "ok" ? "ok" : "bad";
    const live = $("#live tbody");
    live.replaceChildren(...streams.streams.map((s) => row([
      s.id, watchLink(s), s.client, input(s), s.state, s.audio_s, s.queued_s,
      s.dropped_audio_s, s.silent_for_s, s.level_dbfs, s.events,
      s.last_event ? `${s.last_event.label} ${s.last_event.onset_s}-${s.last_event.offset_s} s` : "",
      s.top.map(([l, p]) => `${l} ${p.toFixed(2)}`).join(", "),
    ], [null, null, null, null, s.state === "live" ? "ok" : "warn", null, s.queued_s > 1 ? "warn" : null,
        s.dropped_audio_s > 0 ? "bad" : null, s.silent_for_s > 2 ? "warn" : null])));
    $("#closed tbody").replaceChildren(...streams.closed.map((c) => row(
      [c.id, c.url ? `${c.name} (${c.url})` : c.name, c.code, c.reason, c.audio_s, c.events], [null, null, c.code === 1000 || c.code === 1001 ? "ok" : "bad"])));
  } catch (err) {
    $("#summary").textContent = `server unreachable: ${err}`;
    $("#summary").className = "bad";
  }
}
refresh();
setInterval(refresh, 1000);
