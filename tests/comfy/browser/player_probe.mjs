// In-page measurement of the live player (or any <video>s), passed to page.evaluate as a function.
// It watches every element the player may show and records, once the first frame has played:
//   * stalls: `waiting` / `stalled` on the element that is seen and heard, while it is not paused
//     (a deliberate buffering pause is a `pause`, counted by the player, not a stall);
//   * frameOffsets: at each presented frame (requestVideoFrameCallback), the element's clock
//     (currentTime, which follows the audio) minus that frame's media time;
//   * pictureAge: at every animation frame while playing, the clock minus the media time of the frame
//     on screen. A picture frozen while the sound goes on makes this grow without bound, though no new
//     frame (hence no frameOffsets entry) is presented.
// install(target) returns nothing; window.__ofProbe.summary() gives the numbers.
export function installProbe(target, fps = 24) {
  const P = { stalls: [], events: [], frameOffsets: [], pictureAge: [], frames: 0, firstPlaying: null, timeline: [], worst: [], ageSeries: [], starts: [], lastFrontPause: null,
              stop: false };
  const front = () => target.video;
  target.videos.forEach((v, i) => {
    const st = { shown: null };
    v.__ofProbe = st;
    const mark = (ev) => () => {
      const rec = { ev, i, front: v === front(), t: +v.currentTime.toFixed(3), paused: v.paused,
                    at: Math.round(performance.now()), state: target.state ?? null };
      if (P.events.length < 400) P.events.push(rec);
      if (ev === "playing" && P.firstPlaying === null && rec.front) P.firstPlaying = rec.at;
      if (ev === "playing" && rec.front) {
        // how much was there to play when it (re)started: the buffered media (MSE) or the loaded file
        const b = v.buffered;
        const end = target.mode === "file" && Number.isFinite(v.duration) ? v.duration : b.length ? b.end(b.length - 1) : 0;
        // a swap of elements pauses one and plays the other in the same task; a real (re)start has a gap
        P.starts.push({ t: rec.t, ahead: +(end - v.currentTime).toFixed(3), complete: !!target.complete,
                        gapMs: P.lastFrontPause === null ? null : rec.at - P.lastFrontPause });
      }
      if (ev === "pause") P.lastFrontPause = rec.at; // only a playing element can pause: the front, or the one just swapped out
      if ((ev === "waiting" || ev === "stalled") && P.firstPlaying !== null && rec.front && !v.paused) P.stalls.push(rec);
    };
    for (const ev of ["playing", "waiting", "stalled", "pause", "play", "ended", "seeking", "seeked", "error"]) {
      v.addEventListener(ev, mark(ev));
    }
    // after a seek, the frame on screen is the one that holds currentTime (until a frame callback says more)
    v.addEventListener("seeked", () => { st.shown = Math.floor(v.currentTime * fps + 1e-6) / fps; });
    v.addEventListener("loadstart", () => { st.shown = null; });
    const onFrame = (now, md) => {
      st.shown = md.mediaTime;
      if (v === front() && !v.paused && !v.seeking && P.firstPlaying !== null) {
        P.frameOffsets.push((v.currentTime - md.mediaTime) * 1000);
        P.frames += 1;
      }
      v.requestVideoFrameCallback(onFrame);
    };
    v.requestVideoFrameCallback(onFrame);
  });
  let lastTimeline = 0;
  const sample = (now) => {
    const v = front();
    const shown = v.__ofProbe?.shown;
    if (!v.paused && !v.seeking && !v.ended && shown != null && v.readyState >= 2 && P.firstPlaying !== null) {
      const age = (v.currentTime - shown) * 1000;
      P.pictureAge.push(age);
      if (P.ageSeries.length < 6000) P.ageSeries.push([Math.round(now), Math.round(age)]);
      if (age > 60 && P.worst.length < 50) P.worst.push({ age: Math.round(age), at: Math.round(now), t: +v.currentTime.toFixed(3), shown, i: target.videos.indexOf(v) });
    }
    if (now - lastTimeline > 250 && P.timeline.length < 2000) {
      lastTimeline = now;
      const b = v.buffered;
      P.timeline.push([Math.round(now), +v.currentTime.toFixed(3), b.length ? +b.end(b.length - 1).toFixed(3) : 0,
                       v.paused ? 1 : 0, target.state ?? null]);
    }
    if (!P.stop) requestAnimationFrame(sample);
  };
  requestAnimationFrame(sample);
  const stats = (xs) => {
    const a = xs.map(Math.abs).sort((x, y) => x - y);
    return { n: a.length, max: a.length ? a[a.length - 1] : null, p95: a.length ? a[Math.floor(0.95 * (a.length - 1))] : null,
             p50: a.length ? a[Math.floor(0.5 * (a.length - 1))] : null };
  };
  P.summary = () => ({ stalls: P.stalls.length, stallEvents: P.stalls.slice(0, 10), frames: P.frames,
                       frameOffset: stats(P.frameOffsets), pictureAge: stats(P.pictureAge),
                       started: P.firstPlaying !== null, events: P.events, starts: P.starts, worst: P.worst, ageSeries: P.ageSeries, timeline: P.timeline });
  window.__ofProbe = P;
}
