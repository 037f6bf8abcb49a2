// In-page measurement of the live player (or any <video>s), passed to page.evaluate as source text.
// It watches every element the player may show and records, once the first frame has played:
//   * stalls: `waiting` / `stalled` on the element that is seen and heard, while it is not paused
//     (a deliberate buffering pause is a `pause`, counted by the player, not a stall);
//   * frameOffset: for each presented frame (requestVideoFrameCallback), the element's clock
//     (currentTime, which follows the audio) at the moment the frame is on screen, minus that frame's
//     media time. In sync it lies in [0, one frame): the frame shown is the one whose span holds the clock;
//   * pictureAge: at every animation frame while playing, the clock minus the media time of the frame on
//     screen at that moment. A picture frozen while the sound goes on makes this grow for as long as the
//     freeze lasts, though no frame (hence no frameOffset) is presented. In sync it stays below one frame
//     plus one display refresh.
// Both read the clock when the callback runs and take it back to the moment that matters (the clock is
// interpolated in wall time), so a busy page that runs the callbacks late does not inflate them.
// installProbe(target) with target = {videos, video (the one seen), state?, mode?, complete?};
// window.__ofProbe.summary() gives the numbers.
export function installProbe(target, fps = 24) {
  const P = { stalls: [], events: [], frameOffsets: [], pictureAge: [], frames: 0, firstPlaying: null, timeline: [],
              worst: [], starts: [], lastPlaying: null, callbackLateMs: [], stop: false };
  const front = () => target.video;
  target.videos.forEach((v, i) => {
    // the last few frames handed to the screen: {m: media time, d: when it is (or was) to be visible}
    const st = { frames: [] };
    v.__ofProbe = st;
    const mark = (ev) => () => {
      const rec = { ev, i, front: v === front(), t: +v.currentTime.toFixed(3), paused: v.paused,
                    at: Math.round(performance.now()), state: target.state ?? null };
      if (P.events.length < 400) P.events.push(rec);
      if (ev === "playing" && P.firstPlaying === null && rec.front) P.firstPlaying = rec.at;
      if (ev === "playing" && rec.front) {
        // how much there was to play when it (re)started: the buffered media (MSE) or the loaded file;
        // a swap of elements hands over from one playing element to the other, a real (re)start has a gap
        const b = v.buffered;
        const end = target.mode === "file" && Number.isFinite(v.duration) ? v.duration : b.length ? b.end(b.length - 1) : 0;
        P.starts.push({ t: rec.t, ahead: +(end - v.currentTime).toFixed(3), complete: !!target.complete,
                        gapMs: P.lastPlaying === null ? null : rec.at - P.lastPlaying });
      }
      if ((ev === "waiting" || ev === "stalled") && P.firstPlaying !== null && rec.front && !v.paused) P.stalls.push(rec);
    };
    for (const ev of ["playing", "waiting", "stalled", "pause", "play", "ended", "seeking", "seeked", "error"]) {
      v.addEventListener(ev, mark(ev));
    }
    const shown = (m, d) => {
      st.frames.push({ m, d });
      if (st.frames.length > 4) st.frames.shift();
    };
    // after a seek the frame on screen is the one whose span holds currentTime (a frame callback may add more)
    v.addEventListener("seeked", () => shown(Math.floor(v.currentTime * fps + 1e-6) / fps, performance.now()));
    v.addEventListener("loadstart", () => { st.frames = []; });
    const onFrame = (now, md) => {
      shown(md.mediaTime, md.expectedDisplayTime);
      if (v === front() && !v.paused && !v.seeking && P.firstPlaying !== null) {
        const late = (performance.now() - md.expectedDisplayTime) / 1000; // < 0: runs before its vsync
        P.frameOffsets.push((v.currentTime - late * v.playbackRate - md.mediaTime) * 1000);
        P.callbackLateMs.push(late * 1000);
        P.frames += 1;
      }
      v.requestVideoFrameCallback(onFrame);
    };
    v.requestVideoFrameCallback(onFrame);
  });
  let lastTimeline = 0;
  const sample = (now) => {
    const v = front();
    const st = v.__ofProbe;
    if (target.videos.some((e) => !e.paused)) P.lastPlaying = Math.round(performance.now());
    if (!v.paused && !v.seeking && !v.ended && v.readyState >= 2 && P.firstPlaying !== null && st.frames.length) {
      const t = performance.now();
      const clock = v.currentTime;
      // the frame on screen at t: the newest one due by then (the newest callback's may be for the next vsync)
      const on = [...st.frames].reverse().find((f) => f.d <= t) ?? st.frames[0];
      const age = (clock - on.m) * 1000;
      P.pictureAge.push(age);
      if (age > 60 && P.worst.length < 50) P.worst.push({ age: Math.round(age), at: Math.round(t), t: +clock.toFixed(3), shown: on.m, i: target.videos.indexOf(v) });
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
    const q = (f) => (a.length ? a[Math.floor(f * (a.length - 1))] : null);
    return { n: a.length, max: q(1), p95: q(0.95), p50: q(0.5) };
  };
  const dropped = () => target.videos.reduce((n, v) => n + (v.getVideoPlaybackQuality?.().droppedVideoFrames ?? 0), 0);
  P.summary = () => ({ stalls: P.stalls.length, stallEvents: P.stalls.slice(0, 10), frames: P.frames, dropped: dropped(),
                       frameOffset: stats(P.frameOffsets), pictureAge: stats(P.pictureAge),
                       callbackLate: stats(P.callbackLateMs), started: P.firstPlaying !== null, events: P.events,
                       starts: P.starts, worst: P.worst, timeline: P.timeline });
  window.__ofProbe = P;
}
