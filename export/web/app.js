// kddpm in the browser: the reverse process with an exported ONNX denoiser (onnxruntime-web).
//
// The maths is not repeated here: `kddpm export` writes its own plan rows (the coefficients of the
// compiled sampling loop, kddpm.sampling.plans) into the ONNX file's metadata_props as
// "kddpm.plans", and this page applies them step by step, as kddpm/sampling/loop.py does:
//   x0_hat = clip(x0_from_xt * x - x0_from_eps * eps)
//   x      = coef_xt * x + coef_eps * eps + coef_x0 * x0_hat + coef_x0_prev * x0_hat_before + sigma * z
// Page parameters: ?model=URL (default model.onnx beside the page). For tests: ?input=URL of a
// JSON {x_T, labels, guidance, plan} to sample from, ?report=URL to POST the result to, and
// ?screenshot (no time in the status line).

const params = new URLSearchParams(location.search);
const $ = (id) => document.getElementById(id);

// --- The ONNX file's metadata_props, read from its protobuf: ModelProto field 14 holds
// StringStringEntryProto messages (field 1 the key, field 2 the value). -------------------------

function readVarint(bytes, pos) {
  let value = 0;
  let scale = 1;
  let byte;
  do {
    byte = bytes[pos++];
    value += (byte & 0x7f) * scale; // multiplication, not shifts: lengths may pass 2^31
    scale *= 128;
  } while (byte & 0x80);
  return [value, pos];
}

function eachField(bytes, start, end, visit) {
  let pos = start;
  while (pos < end) {
    let key;
    [key, pos] = readVarint(bytes, pos);
    const field = Math.floor(key / 8);
    const wire = key % 8;
    if (wire === 0) [, pos] = readVarint(bytes, pos);
    else if (wire === 1) pos += 8;
    else if (wire === 5) pos += 4;
    else if (wire === 2) {
      let length;
      [length, pos] = readVarint(bytes, pos);
      visit(field, pos, pos + length);
      pos += length;
    } else throw new Error(`not an ONNX file (protobuf wire type ${wire})`);
  }
}

export function onnxMetadata(bytes) {
  const text = new TextDecoder();
  const metadata = {};
  eachField(bytes, 0, bytes.length, (field, start, end) => {
    if (field !== 14) return;
    let key = "";
    let value = "";
    eachField(bytes, start, end, (inner, s, e) => {
      if (inner === 1) key = text.decode(bytes.subarray(s, e));
      if (inner === 2) value = text.decode(bytes.subarray(s, e));
    });
    metadata[key] = value;
  });
  return metadata;
}

// --- Noise: a seeded generator (mulberry32) and Box-Muller normals. The page's seeds are its own:
// the same seed gives the same images in any browser, not those of the Python samplers. ----------

function normals(count, seed) {
  let state = seed >>> 0;
  const uniform = () => {
    state = (state + 0x6d2b79f5) >>> 0;
    let r = Math.imul(state ^ (state >>> 15), 1 | state);
    r = (r + Math.imul(r ^ (r >>> 7), 61 | r)) ^ r;
    return ((r ^ (r >>> 14)) >>> 0) / 4294967296;
  };
  const out = new Float64Array(count);
  for (let i = 0; i < count; i += 2) {
    const radius = Math.sqrt(-2 * Math.log(1 - uniform()));
    const angle = 2 * Math.PI * uniform();
    out[i] = radius * Math.cos(angle);
    if (i + 1 < count) out[i + 1] = radius * Math.sin(angle);
  }
  return out;
}

// --- The reverse process -----------------------------------------------------------------------

// x0_hat clipped as the plans were made: "true" to [-1, 1], "dynamic" dynamic thresholding
// (s = max(1, the 0.995 quantile of |x0_hat| per image, linear interpolation), then clip(x, -s, s) / s).
function clipPrediction(x0, size, mode) {
  if (mode === "false") return;
  if (mode === "true") {
    for (let i = 0; i < x0.length; i++) x0[i] = Math.min(1, Math.max(-1, x0[i]));
    return;
  }
  for (let start = 0; start < x0.length; start += size) {
    const image = x0.subarray(start, start + size);
    const sorted = Float64Array.from(image, Math.abs).sort();
    const position = 0.995 * (size - 1);
    const below = Math.floor(position);
    const above = Math.min(below + 1, size - 1);
    const s = Math.max(1, sorted[below] + (position - below) * (sorted[above] - sorted[below]));
    for (let i = 0; i < size; i++) image[i] = Math.min(s, Math.max(-s, image[i])) / s;
  }
}

// eps(x_t, t) for a batch; class-conditional models take labels in [0, K] (K: none) and
// classifier-free guidance w: (1 + w) eps(x_t, t, c) - w eps(x_t, t, K), one run on the doubled batch.
async function epsOf(model, x, t, batch, labels, w) {
  const feeds = (images, count, classes) => {
    const inputs = {
      x_t: new ort.Tensor("float32", images, [count, ...model.imageShape]),
      t: new ort.Tensor("int32", new Int32Array(count).fill(t), [count]),
    };
    if (model.numClasses) inputs.label = new ort.Tensor("int32", Int32Array.from(classes), [count]);
    return inputs;
  };
  if (!model.numClasses || !w) {
    const result = await model.session.run(feeds(x, batch, labels));
    return result.eps.data;
  }
  const doubled = new Float32Array(2 * x.length);
  doubled.set(x);
  doubled.set(x, x.length);
  const classes = [...labels, ...new Array(batch).fill(model.numClasses)];
  const both = (await model.session.run(feeds(doubled, 2 * batch, classes))).eps.data;
  const eps = new Float32Array(x.length);
  for (let i = 0; i < x.length; i++) eps[i] = (1 + w) * both[i] - w * both[i + x.length];
  return eps;
}

export async function sample(model, plan, xT, labels, w, onStep) {
  const rows = plan.rows;
  const size = model.imageShape.reduce((a, b) => a * b, 1);
  const batch = xT.length / size;
  const x = Float64Array.from(xT); // the loop in float64, as export/onnx_sample.py; the network sees float32
  const x0 = new Float64Array(x.length);
  const x0Before = new Float64Array(x.length);
  for (let k = 0; k < rows.timesteps.length; k++) {
    const eps = await epsOf(model, Float32Array.from(x), rows.timesteps[k], batch, labels, w);
    for (let i = 0; i < x.length; i++) x0[i] = rows.x0_from_xt[k] * x[i] - rows.x0_from_eps[k] * eps[i];
    clipPrediction(x0, size, model.clipX0);
    const z = rows.sigma[k] ? normals(x.length, 7919 * (k + 1)) : null;
    for (let i = 0; i < x.length; i++) {
      x[i] = rows.coef_xt[k] * x[i] + rows.coef_eps[k] * eps[i] + rows.coef_x0[k] * x0[i]
        + rows.coef_x0_prev[k] * x0Before[i] + (z ? rows.sigma[k] * z[i] : 0);
    }
    x0Before.set(x0);
    if (onStep) await onStep(k + 1, rows.timesteps.length, x0);
  }
  return Float32Array.from(x);
}

// --- Drawing: a grid as kddpm's (columns = ceil(sqrt(n)), 2-px gaps, tiles enlarged to >= 512 px). -

function draw(canvas, images, imageShape) {
  const [height, width, channels] = imageShape;
  const size = height * width * channels;
  const count = images.length / size;
  const columns = Math.ceil(Math.sqrt(count));
  const rows = Math.ceil(count / columns);
  const gap = 2;
  const scale = Math.max(1, Math.ceil((512 - gap * (columns - 1)) / (columns * width)));
  canvas.width = columns * width * scale + gap * (columns - 1);
  canvas.height = rows * height * scale + gap * (rows - 1);
  const context = canvas.getContext("2d");
  const pixels = context.createImageData(canvas.width, canvas.height);
  pixels.data.fill(255);
  for (let n = 0; n < count; n++) {
    const left = (n % columns) * (width * scale + gap);
    const top = Math.floor(n / columns) * (height * scale + gap);
    for (let y = 0; y < height * scale; y++) {
      for (let xx = 0; xx < width * scale; xx++) {
        const source = n * size + (Math.floor(y / scale) * width + Math.floor(xx / scale)) * channels;
        const target = ((top + y) * canvas.width + left + xx) * 4;
        for (let c = 0; c < 3; c++) {
          const value = images[source + (channels === 3 ? c : 0)];
          pixels.data[target + c] = Math.round(Math.min(255, Math.max(0, (value + 1) * 127.5)));
        }
      }
    }
  }
  context.putImageData(pixels, 0, 0);
}

// --- The page --------------------------------------------------------------------------------------

async function loadModel(url) {
  const response = await fetch(url);
  if (!response.ok) throw new Error(`cannot fetch ${url} (HTTP ${response.status}); put model.onnx beside the page or pass ?model=URL`);
  const bytes = new Uint8Array(await response.arrayBuffer());
  const metadata = onnxMetadata(bytes);
  if (metadata["kddpm.format"] !== "1" || !metadata["kddpm.plans"]) {
    throw new Error(`${url} is not an ONNX file written by a kddpm export with sampling plans; export it again with kddpm export`);
  }
  ort.env.wasm.numThreads = 1; // no cross-origin isolation needed, so any static server (and GitHub Pages) works
  ort.env.wasm.wasmPaths = new URL("node_modules/onnxruntime-web/dist/", location.href).href;
  const session = await ort.InferenceSession.create(bytes, { executionProviders: ["wasm"] });
  return {
    session,
    imageShape: JSON.parse(metadata["kddpm.image_shape"]),
    numClasses: Number(metadata["kddpm.num_classes"] || 0),
    classNames: JSON.parse(metadata["kddpm.class_names"] || "[]"),
    clipX0: metadata["kddpm.clip_x0"],
    plans: JSON.parse(metadata["kddpm.plans"]),
  };
}

function describe(model) {
  const [h, w, c] = model.imageShape;
  const kind = model.numClasses ? `class-conditional (${model.numClasses} classes)` : "unconditional";
  return `${model.numClasses ? "A" : "An"} ${kind} model of ${h}x${w}x${c} images. Everything runs in this browser (onnxruntime-web, WebAssembly).`;
}

function fail(error) {
  const status = $("status");
  status.textContent = `Error: ${error.message}`;
  status.className = "error";
  if (params.get("report")) {
    fetch(params.get("report"), { method: "POST", body: JSON.stringify({ error: error.message }) });
  }
}

async function main() {
  const status = $("status");
  let model;
  try {
    model = await loadModel(params.get("model") || "model.onnx");
  } catch (error) {
    $("about").textContent = "";
    fail(error);
    return;
  }
  $("about").textContent = describe(model);
  model.plans.forEach((plan, index) => $("plan").add(new Option(`${plan.sampler}, ${plan.steps} steps`, index)));
  if (model.numClasses) {
    model.classNames.forEach((name, index) => $("class").add(new Option(name, index)));
    $("class").add(new Option("(none)", model.numClasses));
    $("class-field").hidden = false;
    $("guidance-field").hidden = false;
    $("guidance").oninput = () => { $("guidance-value").textContent = $("guidance").value; };
  }
  const canvas = $("grid");
  const size = model.imageShape.reduce((a, b) => a * b, 1);

  async function run(xT, labels, w, plan) {
    $("controls").disabled = true;
    const started = performance.now();
    const images = await sample(model, plan, xT, labels, w, async (step, steps, x0) => {
      status.textContent = `Step ${step}/${steps}: the predicted x_0`;
      draw(canvas, x0, model.imageShape);
      await new Promise((resolve) => setTimeout(resolve, 0)); // let the page repaint
    });
    const seconds = (performance.now() - started) / 1000;
    draw(canvas, images, model.imageShape);
    // (?screenshot: Chromium's screenshot mode runs on a virtual clock, so the time would be wrong.)
    const took = params.has("screenshot") ? "" : `: ${seconds.toFixed(1)} s`;
    status.textContent = `${xT.length / size} images, ${plan.sampler} ${plan.steps} steps${took}`;
    $("controls").disabled = false;
    $("download").disabled = false;
    return { images, seconds };
  }

  $("sample").onclick = () => {
    const count = Math.max(1, Math.min(64, Number($("count").value) || 1));
    const xT = Float32Array.from(normals(count * size, Number($("seed").value) || 0));
    const label = Number($("class").value || 0);
    run(xT, new Array(count).fill(label), model.numClasses ? Number($("guidance").value) : 0,
      model.plans[Number($("plan").value)]);
  };
  $("download").onclick = () => canvas.toBlob((blob) => {
    const link = document.createElement("a");
    link.href = URL.createObjectURL(blob);
    link.download = "kddpm-samples.png";
    link.click();
  });
  $("controls").disabled = false;

  if (params.get("input")) {
    // The test hook: sample from a given x_T and report the result.
    const input = await (await fetch(params.get("input"))).json();
    const plan = model.plans[input.plan || 0];
    let result;
    try {
      result = await run(Float32Array.from(input.x_T), input.labels || [], input.guidance || 0, plan);
    } catch (error) {
      fail(error);
      return;
    }
    if (params.get("report")) {
      await fetch(params.get("report"), {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ images: Array.from(result.images), seconds: result.seconds, plan }),
      });
    }
    document.title = "kddpm: done";
  }
}

main();
