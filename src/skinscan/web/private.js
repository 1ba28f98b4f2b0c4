// Private mode: check a photo on this device with ONNX Runtime Web. The photo never leaves the browser.
//
// JavaScript here only decodes the file and hands pixels over. Everything the model's card decides
// (resizing, colour constancy, normalisation, calibration per photo type, the quality gate, the heatmap's
// influence) runs in the two graphs skinscan builds from the card (skinscan/graphs.py), the same graphs the
// server runs. What this file still computes itself, and the server in Python: the size the decoder bounds
// a photo to (`boundedSize`; preprocess.DECODE_SIDE_FACTOR and Pillow's JPEG draft) and the heatmap's colours
// (`TURBO`, explain.py); tests/test_web.py compares both sides' results.

const VENDOR = new URL("./vendor/onnxruntime-web/", import.meta.url).href;
const MANIFEST = new URL("../private/model.json", import.meta.url).href;

let engine = null; // {ort, manifest, before, model, after}

// Can this browser run the model? (WebAssembly with SIMD, createImageBitmap, OffscreenCanvas)
export function deviceSupported() {
  try {
    const simd = WebAssembly.validate(
      new Uint8Array([0, 97, 115, 109, 1, 0, 0, 0, 1, 5, 1, 96, 0, 1, 123, 3, 2, 1, 0, 10, 10, 1, 8, 0, 65, 0, 253, 15, 253, 98, 11]),
    );
    return simd && typeof createImageBitmap === "function" && typeof OffscreenCanvas === "function";
  } catch {
    return false;
  }
}

export async function manifest() {
  const response = await fetch(MANIFEST, { cache: "no-cache" });
  if (!response.ok) throw new Error(`no private mode here (status ${response.status})`);
  return response.json();
}

// Load the runtime, the model and the graphs (once; the service worker keeps them for offline use).
export async function load() {
  if (engine) return engine;
  const meta = await manifest();
  const ort = await import("./vendor/onnxruntime-web/ort.wasm.min.mjs");
  ort.env.wasm.wasmPaths = VENDOR;
  // threads: ONNX Runtime's own choice (half the cores, at most 4) where the page is cross-origin isolated,
  // one where it is not. Its threads are module workers of ort-wasm-simd-threaded.mjs, which the server sends
  // with COEP (service.py), or Chromium blocks them and the first session never finishes.
  ort.env.wasm.proxy = false;
  const base = new URL("..", MANIFEST).href; // the site's root
  const open = async (path) => {
    const response = await fetch(new URL(path, base).href);
    if (!response.ok) throw new Error(`could not load ${path} (status ${response.status})`);
    return ort.InferenceSession.create(new Uint8Array(await response.arrayBuffer()), { executionProviders: ["wasm"] });
  };
  const [before, model, after] = await Promise.all([open(meta.before), open(meta.model), open(meta.after)]);
  engine = { ort, manifest: meta, before, model, after };
  return engine;
}

// The size the decoder hands the graph: for a JPEG first the reduction Pillow's draft makes on the server
// (the largest of 1/2, 1/4, 1/8 that keeps the shorter side at least `factor` x `size`:
// preprocess.DECODE_SIDE_FACTOR), then a shorter side of at most `factor` x `size`. A photo up to that size
// reaches the graph as decoded, and the graph's antialiased resize is its only one, as Pillow's is on the server.
export function boundedSize(width, height, size, factor, jpeg) {
  let w = width;
  let h = height;
  if (jpeg) {
    const scale = (factor * size) / Math.min(w, h);
    // as preprocess.decode_image asks and Pillow's JpegImageFile.draft picks
    const want = [Math.max(1, Math.floor(w * scale + 0.999)), Math.max(1, Math.floor(h * scale + 0.999))];
    for (const k of [8, 4, 2]) {
      if (Math.floor(w / want[0]) >= k && Math.floor(h / want[1]) >= k) {
        [w, h] = [Math.ceil(w / k), Math.ceil(h / k)];
        break;
      }
    }
  }
  const limit = factor * size;
  const shorter = Math.min(w, h);
  if (shorter > limit) {
    const k = Math.ceil(shorter / limit);
    [w, h] = [Math.max(1, Math.floor(w / k)), Math.max(1, Math.floor(h / k))];
  }
  return [w, h];
}

// Decode a file to upright RGB pixels for the graph. The EXIF orientation is applied; an embedded colour
// profile is ignored, as Pillow on the server ignores it. Transparent parts are composited over white.
export async function decode(file) {
  const options = { imageOrientation: "from-image", colorSpaceConversion: "none", premultiplyAlpha: "none" };
  const full = await createImageBitmap(file, options);
  const { size, max_side_factor: factor } = engine.manifest;
  const jpeg = /jpe?g/i.test(file.type || "") || /\.jpe?g$/i.test(file.name || "");
  const [w, h] = boundedSize(full.width, full.height, size, factor, jpeg);
  const bitmap =
    w === full.width && h === full.height
      ? full
      : await createImageBitmap(full, { resizeWidth: w, resizeHeight: h, resizeQuality: "high" });
  const canvas = new OffscreenCanvas(w, h);
  const ctx = canvas.getContext("2d", { willReadFrequently: true });
  ctx.fillStyle = "#fff";
  ctx.fillRect(0, 0, w, h);
  ctx.drawImage(bitmap, 0, 0);
  const rgba = ctx.getImageData(0, 0, w, h).data;
  const rgb = new Uint8Array(w * h * 3);
  for (let i = 0, j = 0; i < rgba.length; i += 4, j += 3) {
    rgb[j] = rgba[i];
    rgb[j + 1] = rgba[i + 1];
    rgb[j + 2] = rgba[i + 2];
  }
  const shorterSide = Math.min(full.width, full.height);
  if (bitmap !== full) bitmap.close();
  full.close();
  return { rgb, width: w, height: h, shorterSide };
}

// One photo, checked on the device: a result shaped like the server's /v1/predict answer.
export async function check(file, { force = false } = {}) {
  const { ort, manifest: meta, before, model, after } = await load();
  const t0 = performance.now();
  const photo = await decode(file);
  const t1 = performance.now();
  const pre = await before.run({ pixels: new ort.Tensor("uint8", photo.rgb, [photo.height, photo.width, 3]) });
  const net = await model.run({ [meta.input_name]: pre.image });
  const post = await after.run({
    logit: net.logit.reshape ? net.logit.reshape([1]) : new ort.Tensor("float32", net.logit.data, [1]),
    embedding: net.embedding,
    cam: net.cam,
    shorter_side: new ort.Tensor("float32", new Float32Array([photo.shorterSide]), [1]),
    measures: new ort.Tensor("float32", pre.measures.data, [1, meta.measures.length]),
  });
  const t2 = performance.now();
  const problems = meta.problems.filter((_, i) => Boolean(post.problems.data[i]));
  const reasons = problems.map((code) =>
    meta.reasons[code].replace("{side}", String(photo.shorterSide)).replace("{min_side}", String(meta.min_side)),
  );
  const retake = problems.length > 0;
  const probability = retake && !force ? null : Number(post.probability.data[0]);
  const threshold = Number(post.threshold.data[0]);
  const decision = probability === null ? null : probability >= threshold ? "refer" : "monitor";
  const [camH, camW] = net.cam.dims.slice(1);
  return {
    probability,
    decision,
    threshold,
    advice: decision ? meta.advice[decision] : null,
    quality: retake ? "retake" : "ok",
    reasons,
    problems,
    photo_type: meta.photo_types ? (post.is_phone.data[0] ? "phone" : "dermoscopic") : null,
    adjustments: [],
    influence: Array.from({ length: camH }, (_, i) => Array.from(post.influence.data.slice(i * camW, (i + 1) * camW))),
    square: pre.square,
    model: { name: meta.name, version: meta.version, sha256: meta.sha256 },
    mode: "device",
    threads: ort.env.wasm.numThreads,
    timing_ms: { decode: t1 - t0, infer: t2 - t1 },
  };
}

// The Turbo colour map at 17 points (explain._TURBO): the heatmap's colours.
const TURBO = [
  [35, 23, 27], [73, 62, 175], [68, 106, 238], [50, 149, 247], [38, 189, 225], [41, 221, 187], [64, 243, 146],
  [102, 253, 109], [150, 250, 80], [198, 235, 59], [238, 208, 45], [255, 171, 36], [255, 128, 29], [238, 84, 21],
  [201, 45, 12], [161, 18, 2], [144, 13, 0],
];

function turbo(v) {
  const x = Math.min(1, Math.max(0, v)) * (TURBO.length - 1);
  const i = Math.min(TURBO.length - 2, Math.floor(x));
  const f = x - i;
  return TURBO[i].map((c, k) => Math.round(c + (TURBO[i + 1][k] - c) * f));
}

// The heatmap drawn over the photo's centre square (what the model looked at), as a PNG data URL.
export async function heatmapPng(file, influence) {
  const bitmap = await createImageBitmap(file, { imageOrientation: "from-image" });
  const scale = Math.min(1, 1024 / Math.max(bitmap.width, bitmap.height));
  const w = Math.round(bitmap.width * scale);
  const h = Math.round(bitmap.height * scale);
  const canvas = new OffscreenCanvas(w, h);
  const ctx = canvas.getContext("2d");
  ctx.drawImage(bitmap, 0, 0, w, h);
  bitmap.close();
  const side = Math.min(w, h);
  const left = (w - side) / 2;
  const top = (h - side) / 2;
  ctx.fillStyle = "rgba(128,128,128,0.55)"; // the strips the model did not look at
  ctx.fillRect(0, 0, w, top);
  ctx.fillRect(0, top + side, w, h - top - side);
  ctx.fillRect(0, top, left, side);
  ctx.fillRect(left + side, top, w - left - side, side);
  const rows = influence.length;
  const cols = influence[0].length;
  const grid = new OffscreenCanvas(cols, rows);
  const gctx = grid.getContext("2d");
  const cells = gctx.createImageData(cols, rows);
  influence.flat().forEach((v, i) => {
    const [r, g, b] = turbo(v);
    cells.data.set([r, g, b, 140], i * 4);
  });
  gctx.putImageData(cells, 0, 0);
  ctx.imageSmoothingEnabled = true;
  ctx.drawImage(grid, left, top, side, side);
  const blob = await canvas.convertToBlob({ type: "image/png" });
  const bytes = new Uint8Array(await blob.arrayBuffer());
  let binary = "";
  for (let i = 0; i < bytes.length; i += 0x8000) binary += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  return btoa(binary);
}

export function loaded() {
  return engine !== null;
}
