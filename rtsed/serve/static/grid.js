// The grid page: every stream on the server and its health, from GET /streams and /health, once a second.
const $ = (s) => document.querySelector(s);
const cell = (v) => { const td = document.createElement("td"); td.textContent = v ?? ""; return td; };

function row(values, cls) {
  const tr = document.createElement("tr");
  values.forEach((v, i) => { const td = cell(v); if (cls && cls[i]) td.className = cls[i]; tr.append(td); });
  return tr;
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
      s.id, s.name, s.client, `${s.sample_rate} Hz ${s.channels} ch ${s.format}`, s.state, s.audio_s, s.queued_s,
      s.dropped_audio_s, s.silent_for_s, s.level_dbfs, s.events,
      s.last_event ? `${s.last_event.label} ${s.last_event.onset_s}-${s.last_event.offset_s} s` : "",
      s.top.map(([l, p]) => `${l} ${p.toFixed(2)}`).join(", "),
    ], [null, null, null, null, s.state === "live" ? "ok" : "warn", null, s.queued_s > 1 ? "warn" : null,
        s.dropped_audio_s > 0 ? "bad" : null, s.silent_for_s > 2 ? "warn" : null])));
    $("#closed tbody").replaceChildren(...streams.closed.map((c) => row(
      [c.id, c.name, c.code, c.reason, c.audio_s, c.events], [null, null, c.code === 1000 || c.code === 1001 ? "ok" : "bad"])));
  } catch (err) {
    $("#summary").textContent = `server unreachable: ${err}`;
    $("#summary").className = "bad";
  }
}
refresh();
setInterval(refresh, 1000);
