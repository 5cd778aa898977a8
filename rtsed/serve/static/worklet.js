// AudioWorklet processor: copies each 128-frame render quantum of the microphone, downmixed to
// mono, to the main thread. It runs on the audio rendering thread, so it only copies.
class CaptureProcessor extends AudioWorkletProcessor {
  process(inputs) {
    const input = inputs[0];
    if (input && input.length) {
      const n = input[0].length;
      const mono = new Float32Array(n);
      for (const channel of input) for (let i = 0; i < n; i++) mono[i] += channel[i] / input.length;
      this.port.postMessage(mono, [mono.buffer]);
    }
    return true;
  }
}
registerProcessor("rtsed-capture", CaptureProcessor);
