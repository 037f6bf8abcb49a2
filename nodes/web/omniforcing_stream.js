// Live player for the "OmniForcing Stream" node: plays the growing fragmented MP4 with sound inside
// the node while it generates. The server sends an "omniforcing.stream" websocket event after every
// block. Two ways to load it, chosen per page:
//   * "mse": re-read the HLS playlist, append each new fMP4 segment to a MediaSource (gapless);
//   * "file": play the growing MP4 itself. Used when the page forbids blob: media (ComfyUI sends such a
//     Content-Security-Policy with --disable-api-nodes) or MediaSource is missing or fails. A <video>
//     cannot grow its file, so two elements take turns: the grown file loads into the hidden one, which
//     seeks to where the visible one will be and takes over at that moment (no black frame, no spinner).
//
// Playback never runs dry: it starts once StartBufferSeconds are buffered ahead, and when generation is
// slower than real time it pauses LIVE_MARGIN before the last buffered frame (a clean pause of picture
// and sound together, shown as "buffering") and resumes once StartBufferSeconds are buffered again. An
// element that runs past its last frame waits or, in file mode, may freeze the picture while the sound
// goes on - that is what this avoids. When the stream has finished, it plays to the end.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const EVENT = "omniforcing.stream";
const NODE_TYPE = "OmniForcingStream";
const FINISHED = new Set(["done", "cancelled", "error"]);
const START_SETTING = "OmniForcing.LivePlayer.StartBufferSeconds";
const START_DEFAULT = 1.0; // about one block
// pause this far before the last buffered frame: the decoders still have data queued, so the element
// never reaches its end while the stream goes on (it would fire 'waiting' or freeze the picture)
const LIVE_MARGIN = 0.25;
const TICK_MS = 40; // about one frame at 24 fps: the margin is reached with ~5 checks to spare
const PREPARE_AHEAD = 3.0; // file mode: load the grown file once less than this is left in the loaded one

function viewUrl(filename, subfolder, type = "output") {
  const q = new URLSearchParams({ filename, subfolder: subfolder || "", type });
  return api.apiURL(`/view?${q}`);
}

async function fetchBytes(url) {
  const r = await fetch(url, { cache: "no-store" });
  if (!r.ok) throw new Error(`${r.status} ${url}`);
  return new Uint8Array(await r.arrayBuffer());
}

function startBufferSeconds() {
  let v;
  try {
    v = app.extensionManager?.setting?.get?.(START_SETTING) ?? app.ui?.settings?.getSettingValue?.(START_SETTING);
  } catch {
    v = undefined; // settings not loaded yet
  }
  v = Number(v);
  return Number.isFinite(v) && v >= 0 ? v : START_DEFAULT;
}

// The codecs string MediaSource needs, read from the init segment (avcC profile/level, AAC-LC).
function codecsFromInit(init) {
  const find = (s) => {
    outer: for (let i = 0; i + 4 <= init.length; i++) {
      for (let j = 0; j < 4; j++) if (init[i + j] !== s.charCodeAt(j)) continue outer;
      return i;
    }
    return -1;
  };
  const hex = (b) => b.toString(16).padStart(2, "0");
  const codecs = [];
  const a = find("avcC");
  if (a >= 0) codecs.push(`avc1.${hex(init[a + 5])}${hex(init[a + 6])}${hex(init[a + 7])}`);
  if (find("mp4a") >= 0) codecs.push("mp4a.40.2");
  return `video/mp4; codecs="${codecs.join(",")}"`;
}

// end of the buffered range that holds t (buffered is already audio AND video: both must be there)
function bufferedEnd(v, t) {
  const b = v.buffered;
  for (let i = 0; i < b.length; i++) if (b.start(i) <= t + 0.05 && t < b.end(i)) return b.end(i);
  return t;
}

function playableEnd(v) {
  if (!v.currentSrc || v.readyState < 1) return 0;
  const end = bufferedEnd(v, v.currentTime);
  return Number.isFinite(v.duration) ? Math.min(end, v.duration) : end;
}

class LivePlayer {
  constructor(node) {
    this.node = node;
    this.root = document.createElement("div");
    this.root.className = "omniforcing-live";
    this.root.style.cssText = "display:flex;flex-direction:column;gap:4px;width:100%;height:100%;min-height:120px";
    const stage = document.createElement("div");
    stage.style.cssText = "position:relative;flex:1;min-height:0;background:#000";
    // two elements stacked in one place: the front one is seen and heard, the back one (file mode only)
    // loads the grown file; swapping their z-order never shows an empty element
    this.videos = [0, 1].map((i) => {
      const v = document.createElement("video");
      v.playsInline = true;
      v.preload = "auto";
      v.style.cssText = "position:absolute;inset:0;width:100%;height:100%;object-fit:contain;background:#000";
      v.addEventListener("pause", () => this.onPause(v));
      v.addEventListener("play", () => this.onPlay(v));
      v.addEventListener("ended", () => this.onEnded(v));
      v.addEventListener("waiting", () => { if (v === this.video) this.tick(); });
      stage.append(v);
      return v;
    });
    // on the picture too, where the eye is: it holds still on purpose, not frozen
    this.badge = document.createElement("div");
    this.badge.style.cssText = "position:absolute;left:6px;top:6px;z-index:2;pointer-events:none;display:none;"
      + "font:11px sans-serif;color:#fff;background:rgba(0,0,0,.6);padding:2px 6px;border-radius:3px";
    stage.append(this.badge);
    this.status = document.createElement("div");
    this.status.style.cssText = "font:11px sans-serif;opacity:.8;white-space:nowrap;overflow:hidden";
    this.status.textContent = "live preview: waiting for a stream";
    this.root.append(stage, this.status);
    const w = node.addDOMWidget("omniforcing_live", "omniforcing_live", this.root, { serialize: false, hideOnZoom: false });
    w.serialize = false;
    w.computeSize = (width) => [width, 260];
    this.margin = LIVE_MARGIN;
    this.key = null;
    this.timer = null;
    this.setFront(0);
  }

  get video() {
    return this.videos[this.front];
  }

  setFront(i) {
    this.front = i;
    this.videos.forEach((v, j) => {
      v.style.zIndex = j === i ? "1" : "0";
      v.controls = j === i;
    });
  }

  // a new stream (new files) replaces the old one
  reset(info) {
    this.key = `${info.prompt_id}/${info.hls_subfolder}`;
    this.info = null; // the old stream's, until update() sets the new one
    if (this.objectUrl) URL.revokeObjectURL(this.objectUrl);
    this.objectUrl = null;
    for (const v of this.videos) {
      v.pause();
      v.removeAttribute("src");
      v.load();
      v.ofOwnPause = v.ofOwnPlay = false; // load() dropped the events these were waiting for
    }
    this.setFront(0);
    this.appended = new Set();
    this.queue = Promise.resolve();
    this.ended = false; // MSE: endOfStream() called
    this.sb = null;
    this.ms = null;
    this.mode = null;
    this.state = "waiting"; // waiting (no data) | buffering | playing | paused (by the user) | ended
    this.started = false;
    this.stats = { bufferingPauses: 0, swaps: 0, loads: 0 };
    this.latest = null; // file mode: newest {url, seconds, final} on disk
    this.versions = [null, null]; // file mode: the file version each element holds
    this.prep = null; // file mode: the back element getting ready to take over
    this.skipped = null; // file mode: a version too short to take over from the front
    this.lead = 0.5; // file mode: how far ahead of the front element the back one seeks (adapted to seek time)
    this.ready = window.MediaSource ? this.openMediaSource() : Promise.resolve(this.useFile("no MediaSource"));
    clearInterval(this.timer);
    this.timer = setInterval(() => this.tick(), TICK_MS);
  }

  dispose() {
    clearInterval(this.timer);
    clearTimeout(this.swapTimer);
    for (const v of this.videos) {
      v.pause();
      v.removeAttribute("src");
      v.load();
    }
    if (this.objectUrl) URL.revokeObjectURL(this.objectUrl);
  }

  // MediaSource plays from a blob: URL, which a Content-Security-Policy may forbid (ComfyUI sends one
  // with --disable-api-nodes): try it, fall back to the file on a violation, an error or a timeout.
  openMediaSource() {
    this.mode = "mse";
    this.ms = new MediaSource();
    const url = URL.createObjectURL(this.ms);
    this.objectUrl = url;
    const v = this.video;
    let onCsp;
    const opened = new Promise((resolve, reject) => {
      onCsp = (e) => { if ((e.blockedURI || "").startsWith("blob")) reject(new Error("blocked by the page's CSP")); };
      document.addEventListener("securitypolicyviolation", onCsp);
      this.ms.addEventListener("sourceopen", resolve, { once: true });
      v.addEventListener("error", () => reject(new Error("the video refused the MediaSource")), { once: true });
      setTimeout(() => reject(new Error("MediaSource did not open")), 5000);
    });
    v.src = url;
    return opened.catch((e) => {
      v.removeAttribute("src");
      v.load(); // clears the refused source's error
      this.useFile(e);
    })
      .finally(() => document.removeEventListener("securitypolicyviolation", onCsp));
  }

  useFile(why) {
    if (why) console.warn("[OmniForcing] live player falls back to the MP4 file:", why.message || why);
    this.mode = "file";
    this.ms = null;
    this.sb = null;
    this.ended = false;
    if (this.info) this.noteFile(this.info);
  }

  update(info) {
    if (this.key !== `${info.prompt_id}/${info.hls_subfolder}`) this.reset(info);
    this.info = info;
    // one refresh at a time; each reads what is on disk now
    const key = this.key;
    this.queue = this.queue.then(() => this.refresh(key)).catch((e) => {
      if (key !== this.key) return;
      this.useFile(e);
      return this.refresh(key).catch(() => {});
    });
    this.showStatus();
  }

  // everything the stream will have is in the front element: play to the end, never pause for more
  get complete() {
    if (this.mode === "mse") return this.ended;
    const v = this.versions[this.front];
    return !!v && v.final;
  }

  // key: the stream this refresh is for; a refresh still running when a new stream starts stops at its next step
  async refresh(key) {
    await this.ready;
    if (key !== this.key) return;
    if (this.mode === "file") {
      this.noteFile(this.info);
      this.tick();
      return;
    }
    const info = this.info;
    const text = await fetch(viewUrl(info.playlist, info.hls_subfolder), { cache: "no-store" })
      .then((r) => (r.ok ? r.text() : "")).catch(() => "");
    if (key !== this.key) return;
    const segments = text.split("\n").filter((l) => l && !l.startsWith("#"));
    if (!segments.length) return;
    if (!this.sb) {
      const init = await fetchBytes(viewUrl("init.mp4", info.hls_subfolder));
      if (key !== this.key) return;
      const mime = codecsFromInit(init);
      if (!MediaSource.isTypeSupported(mime)) throw new Error(`this browser cannot play ${mime}`);
      this.sb = this.ms.addSourceBuffer(mime);
      await this.append(init);
    }
    for (const name of segments) {
      if (this.appended.has(name)) continue;
      const bytes = await fetchBytes(viewUrl(name, info.hls_subfolder));
      if (key !== this.key) return;
      await this.append(bytes);
      this.appended.add(name);
    }
    if (FINISHED.has(info.status) && text.includes("#EXT-X-ENDLIST") && !this.ended && this.ms.readyState === "open") {
      this.ended = true;
      this.ms.endOfStream();
    }
    this.tick();
  }

  append(bytes) {
    return new Promise((resolve, reject) => {
      const done = () => { this.sb.removeEventListener("error", fail); resolve(); };
      const fail = () => { this.sb.removeEventListener("updateend", done); reject(new Error("appendBuffer failed")); };
      this.sb.addEventListener("updateend", done, { once: true });
      this.sb.addEventListener("error", fail, { once: true });
      this.sb.appendBuffer(bytes);
    });
  }

  // -- when to play and when to wait ----------------------------------------------------------------

  ahead() {
    const v = this.video;
    return Math.max(0, playableEnd(v) - v.currentTime);
  }

  tick() {
    if (!this.info || this.state === "ended") return;
    // only the front element is ever heard: one left playing behind would double the sound
    for (const b of this.videos) if (b !== this.video && !b.paused) this.ownPause(b);
    if (this.mode === "file") this.fileTick();
    const v = this.video;
    if (!v.currentSrc || v.readyState < 1) return this.showStatus();
    const ahead = this.ahead();
    if (this.state === "waiting" && playableEnd(v) > 0) this.state = "buffering";
    if (this.state === "buffering") {
      // MSE may start a little after 0 (the first frame's time): begin where the data begins
      if (!this.started && v.buffered.length && v.currentTime < v.buffered.start(0)) v.currentTime = v.buffered.start(0);
      if (this.complete) {
        if (ahead > 0.02) this.resume();
        else this.state = "ended"; // stopped right at the end: nothing left to play
      } else if (ahead >= Math.max(startBufferSeconds(), 2 * this.margin)) this.resume();
    } else if (this.state === "playing" && !this.complete && ahead < this.margin && !v.seeking) {
      this.bufferPause();
    }
    this.showStatus();
  }

  resume() {
    const v = this.video;
    this.state = "playing";
    if (this.mode === "mse" && this.started) {
      // after a buffering pause, seek to where it stands first: audio and video restart together from
      // one position (played on, the picture lagged the sound by 2-3 frames for a moment)
      v.addEventListener("seeked", () => { if (this.state === "playing" && v === this.video) this.ownPlay(v); }, { once: true });
      v.currentTime = v.currentTime;
      return;
    }
    this.started = true;
    this.ownPlay(v);
  }

  bufferPause() {
    this.state = "buffering";
    this.stats.bufferingPauses += 1;
    this.ownPause(this.video);
  }

  // our own play()/pause() are flagged so that the events they fire are not taken for the user's
  ownPause(v) {
    if (v.paused) return;
    v.ofOwnPause = true;
    v.pause();
  }

  ownPlay(v) {
    if (!v.paused) return;
    v.ofOwnPlay = true;
    v.play().catch((e) => {
      if (e?.name !== "NotAllowedError") return;
      // autoplay with sound needs a user gesture on some browsers: start muted, the user can unmute
      v.muted = true;
      v.ofOwnPlay = true;
      v.play().catch(() => {});
    });
  }

  onPause(v) {
    if (v.ofOwnPause) { v.ofOwnPause = false; return; }
    if (v !== this.video || v.ended || this.state !== "playing") return;
    this.state = "paused"; // the user paused: do not fight them
    this.showStatus();
  }

  onPlay(v) {
    if (v.ofOwnPlay) { v.ofOwnPlay = false; return; }
    if (v !== this.video || !this.info) return;
    // the user pressed play: play (if it is too close to the edge, the next tick pauses to buffer)
    this.state = "playing";
    this.started = true;
    this.tick();
  }

  onEnded(v) {
    if (v !== this.video || !this.info) return;
    // the end of a file that is still growing: wait for the next one (the margin should prevent this)
    this.state = this.complete ? "ended" : "buffering";
    this.showStatus();
  }

  // -- file mode: two elements take turns --------------------------------------------------------------

  noteFile(info) {
    if (!(info.seconds > 0)) return;
    const final = FINISHED.has(info.status);
    const l = this.latest;
    if (l && info.seconds <= l.seconds && (l.final || !final)) return;
    const url = `${viewUrl(info.mp4, info.subfolder)}&v=${info.seconds}${final ? "e" : ""}`; // a new URL: no cached copy
    this.latest = { url, seconds: info.seconds, final };
  }

  fileTick() {
    const f = this.video;
    const cur = this.versions[this.front];
    const latest = this.latest;
    if (!latest || latest === cur || latest === this.skipped) return;
    const p = this.prep;
    if (!p) {
      if (!cur || f.paused || playableEnd(f) - f.currentTime < PREPARE_AHEAD) this.prepare(latest);
      return;
    }
    if (p.target === null) {
      // no metadata yet; a file caught mid-rename may never load: start over with the newest one
      if (performance.now() - p.since > 5000) this.prep = null;
      return;
    }
    const b = this.videos[p.index];
    // where the back element must be to take over: exactly where a paused front is, or ahead of a playing one
    const behind = cur && (f.paused ? Math.abs(p.target - f.currentTime) > 0.001 : f.currentTime - p.target > 0.045);
    if (behind) {
      // it was not ready in time: aim further ahead from now on
      if (!f.paused) this.lead = Math.min(2, 2 * this.lead);
      return this.seekPrep(p, f.paused ? f.currentTime : f.currentTime + this.lead);
    }
    if (!p.ready) {
      // ready when the seek is done and it can play on (polled: a missed event must not leave it stuck)
      if (!b.seeking && b.readyState >= 3 && Math.abs(b.currentTime - p.target) < 0.002) {
        p.ready = true;
        // a seek that took s seconds: aim 2 s + 0.1 s ahead next time
        this.lead = Math.min(2, Math.max(0.25, 2 * (performance.now() - p.seekStart) / 1000 + 0.1));
      } else {
        if (performance.now() - p.seekStart > 5000) this.prep = null;
        return;
      }
    }
    if (!cur || f.paused) return this.swap(p, false); // nothing playing: take over at the same position
    const dt = p.target - f.currentTime;
    if (dt <= 0.005) return this.swap(p, true);
    // take over on time, not on the next tick
    if (dt < TICK_MS / 1000 + 0.01 && !this.swapTimer) {
      this.swapTimer = setTimeout(() => { this.swapTimer = null; this.tick(); }, Math.max(0, dt * 1000 - 2));
    }
  }

  prepare(version) {
    const index = 1 - this.front;
    const b = this.videos[index];
    const p = { index, version, ready: false, target: null, since: performance.now() };
    this.prep = p;
    this.stats.loads += 1;
    b.muted = true; // silent until it takes over
    // a new source drops the element's queued events (a 'pause' of ours may never come): forget the flags
    b.ofOwnPause = b.ofOwnPlay = false;
    b.addEventListener("loadedmetadata", () => {
      if (this.prep !== p) return;
      const f = this.video;
      const cur = this.versions[this.front];
      const at = !cur ? (f.currentSrc ? f.currentTime : 0) : f.paused ? f.currentTime : f.currentTime + this.lead;
      this.seekPrep(p, at);
    }, { once: true });
    b.addEventListener("error", () => {
      if (this.prep === p) this.prep = null; // the next tick tries the newest file again
    }, { once: true });
    b.src = version.url;
  }

  seekPrep(p, at) {
    const b = this.videos[p.index];
    const end = Number.isFinite(b.duration) ? b.duration : playableEnd(b);
    if (this.versions[this.front] && !p.version.final && end - at < this.margin) {
      // this file ends before the front element would get there: wait for a longer one
      this.skipped = p.version;
      this.prep = null;
      return;
    }
    p.ready = false;
    p.target = at;
    p.seekStart = performance.now();
    b.currentTime = at;
    p.target = b.currentTime; // the time as the element holds it
  }

  swap(p, playing) {
    const f = this.video;
    const b = this.videos[p.index];
    b.volume = f.volume;
    b.playbackRate = f.playbackRate;
    if (f.currentSrc) b.muted = f.muted;
    else b.muted = false;
    if (playing) {
      this.ownPause(f);
      this.ownPlay(b);
    }
    this.versions[p.index] = p.version;
    this.setFront(p.index);
    this.prep = null;
    this.stats.swaps += 1;
    if (this.state === "ended") this.state = "buffering";
  }

  // -- status line ----------------------------------------------------------------------------------

  showStatus() {
    const info = this.info;
    if (!info) return;
    const where = info.seconds ? `${info.seconds.toFixed(1)} s written` : FINISHED.has(info.status) ? "nothing written" : "decoding";
    const what = FINISHED.has(info.status) ? info.status
      : info.block !== undefined ? `block ${info.block + 1}/${info.blocks}` : info.status;
    const v = this.video;
    const t = `${v.currentTime.toFixed(1)} s`;
    const need = Math.max(startBufferSeconds(), 2 * this.margin);
    const playing = {
      waiting: FINISHED.has(info.status) ? "no video" : "waiting for the first block",
      buffering: this.complete ? `at ${t}` : `buffering ${Math.min(this.ahead(), need).toFixed(1)}/${need.toFixed(1)} s`,
      playing: v.readyState < 3 && !v.paused ? `stalled at ${t}` : `playing ${t}`,
      paused: `paused at ${t}`,
      ended: "played to the end",
    }[this.state];
    const text = `${what} - ${where} - ${playing}`;
    const badge = this.state === "buffering" && !this.complete && this.started ? "buffering..." : "";
    if (this.badge.textContent !== badge) {
      this.badge.textContent = badge;
      this.badge.style.display = badge ? "block" : "none";
    }
    if (this.status.textContent !== text) this.status.textContent = text;
    this.status.title = `${info.mp4} (${this.mode === "file" ? "file" : "MediaSource"})`;
  }
}

function playerFor(node) {
  if (!node.omniforcingPlayer) node.omniforcingPlayer = new LivePlayer(node);
  return node.omniforcingPlayer;
}

app.registerExtension({
  name: "OmniForcing.LiveStreamPlayer",
  settings: [{
    id: START_SETTING,
    category: ["OmniForcing", "Live player", "Start buffer"],
    name: "Live player: seconds buffered before playing",
    tooltip: "The in-node live player starts, and resumes after running low, once this much is buffered ahead. "
      + "More: fewer pauses when generation is slower than real time; less: sound and picture sooner.",
    type: "number",
    attrs: { min: 0.5, max: 30, step: 0.5 },
    defaultValue: START_DEFAULT,
  }],
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData?.name !== NODE_TYPE) return;
    const created = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const r = created?.apply(this, arguments);
      playerFor(this);
      return r;
    };
    const removed = nodeType.prototype.onRemoved;
    nodeType.prototype.onRemoved = function () {
      this.omniforcingPlayer?.dispose();
      return removed?.apply(this, arguments);
    };
  },
  setup() {
    api.addEventListener(EVENT, ({ detail }) => {
      if (!detail) return;
      const graph = app.graph;
      const node = graph?.getNodeById?.(Number(detail.node)) ?? graph?.getNodeById?.(detail.node);
      if (!node || node.type !== NODE_TYPE) return;
      playerFor(node).update(detail);
    });
  },
});
