// skinscan's service worker: after the first visit the page, ONNX Runtime Web, the model and its graphs
// come from this browser's cache, so private mode works offline. The page and private/model.json are asked
// of the network first (a new page or model version replaces the cached one as soon as the server is
// reachable); the model's files live under private/<sha256 prefix>/, which never change, and are dropped
// once a model with another hash replaces them. Nothing is cached of the API (/v1, /v2, /metrics): photos
// and results never enter the cache.
const CACHE = "skinscan";
const SHELL = [
  "./",
  "web/app.js",
  "web/private.js",
  "web/style.css",
  "web/icon.svg",
  "manifest.webmanifest",
  "web/vendor/onnxruntime-web/ort.wasm.min.mjs",
  "web/vendor/onnxruntime-web/ort-wasm-simd-threaded.mjs",
  "web/vendor/onnxruntime-web/ort-wasm-simd-threaded.wasm",
];
const ROOT = new URL("./", self.location).href;

self.addEventListener("install", (event) => {
  event.waitUntil(
    (async () => {
      const cache = await caches.open(CACHE);
      await cache.addAll(SHELL.map((path) => new URL(path, ROOT).href));
      await refreshModel(cache).catch(() => {});
      await self.skipWaiting();
    })(),
  );
});

self.addEventListener("activate", (event) => event.waitUntil(self.clients.claim()));

// Cache model.json and the files it names; drop the files of any other model.
async function refreshModel(cache, response = null) {
  const manifestUrl = new URL("private/model.json", ROOT).href;
  const res = response || (await fetch(manifestUrl, { cache: "no-cache" }));
  if (!res.ok) return;
  const meta = await res.clone().json();
  const wanted = [meta.model, meta.before, meta.after].map((path) => new URL(path, ROOT).href);
  for (const url of wanted) {
    if (!(await cache.match(url))) await cache.add(url);
  }
  await cache.put(manifestUrl, res);
  const folder = new URL(`private/${meta.sha256.slice(0, 12)}/`, ROOT).href;
  for (const request of await cache.keys()) {
    if (request.url.startsWith(new URL("private/", ROOT).href) && request.url !== manifestUrl && !request.url.startsWith(folder)) {
      await cache.delete(request);
    }
  }
}

async function networkFirst(request) {
  const cache = await caches.open(CACHE);
  try {
    const response = await fetch(request, { cache: "no-cache" });
    if (response.ok) {
      if (request.url.endsWith("/private/model.json")) await refreshModel(cache, response.clone()).catch(() => {});
      else await cache.put(request, response.clone());
    }
    return response;
  } catch (err) {
    const cached = await cache.match(request, { ignoreSearch: true });
    if (cached) return cached;
    throw err;
  }
}

async function cacheFirst(request) {
  const cache = await caches.open(CACHE);
  const cached = await cache.match(request);
  if (cached) return cached;
  const response = await fetch(request);
  if (response.ok) await cache.put(request, response.clone());
  return response;
}

self.addEventListener("fetch", (event) => {
  const request = event.request;
  if (request.method !== "GET" || !request.url.startsWith(ROOT)) return; // uploads and other hosts: untouched
  const path = request.url.slice(ROOT.length);
  if (/^(v1|v2|metrics|docs|openapi)/.test(path)) return; // the API is never cached
  const immutable = path.startsWith("private/") && path !== "private/model.json";
  event.respondWith(immutable || path.startsWith("web/vendor/") ? cacheFirst(request) : networkFirst(request));
});
