// The Music Flamingo page: choose, drop or record a song, ask about it, watch the answer stream in, follow up.
// Talks to the same server's OpenAI-compatible API (/v1/chat/completions, stream=true). The server keeps no
// conversation: every question re-sends the whole conversation, the song included (in the first user turn).
"use strict";

const PRESETS = {
  describe:
    "Describe this track in full detail - tell me the genre, tempo, and key, then dive into the instruments, " +
    "production style, and overall mood it creates.",
  key: "What is the key and the tempo (in BPM) of this song?",
  instruments: "Which instruments can you hear, and what role does each one play?",
  lyrics: "Generate a structured lyric sheet from the input music.",
};
// File extensions and media types the server decodes as they are; anything else is decoded here to wav.
const FORMATS = { wav: "wav", wave: "wav", mp3: "mp3", flac: "flac", ogg: "ogg", oga: "ogg" };
const MIME_FORMATS = {
  "audio/wav": "wav", "audio/x-wav": "wav", "audio/wave": "wav", "audio/mpeg": "mp3", "audio/mp3": "mp3",
  "audio/flac": "flac", "audio/x-flac": "flac", "audio/ogg": "ogg",
};
const SAMPLE_RATE = 16000;

const $ = (id) => document.getElementById(id);
const state = {
  model: null,
  song: null, // {data: base64, format, name}
  messages: [], // the conversation so far, in the API's shape
  controller: null, // aborts the answer being streamed
};

function setStatus(text) {
  $("status").textContent = text || "";
}

// ------------------------------------------------------------------------------------------ the song
function readAsBase64(blob) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(String(reader.result).split(",", 2)[1] || "");
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(blob);
  });
}

// Any audio the browser can play -> 16 kHz mono 16-bit wav (recordings, m4a, webm...).
async function toWav(blob) {
  const AudioCtx = window.AudioContext || window.webkitAudioContext;
  const ctx = new AudioCtx();
  let decoded;
  try {
    decoded = await ctx.decodeAudioData(await blob.arrayBuffer());
  } finally {
    ctx.close();
  }
  const frames = Math.max(1, Math.ceil(decoded.duration * SAMPLE_RATE));
  const offline = new OfflineAudioContext(1, frames, SAMPLE_RATE);
  const source = offline.createBufferSource();
  source.buffer = decoded;
  source.connect(offline.destination);
  source.start();
  const samples = (await offline.startRendering()).getChannelData(0);
  const out = new DataView(new ArrayBuffer(44 + samples.length * 2));
  const text = (offset, s) => [...s].forEach((c, i) => out.setUint8(offset + i, c.charCodeAt(0)));
  text(0, "RIFF");
  out.setUint32(4, 36 + samples.length * 2, true);
  text(8, "WAVE");
  text(12, "fmt ");
  out.setUint32(16, 16, true);
  out.setUint16(20, 1, true); // PCM
  out.setUint16(22, 1, true); // mono
  out.setUint32(24, SAMPLE_RATE, true);
  out.setUint32(28, SAMPLE_RATE * 2, true);
  out.setUint16(32, 2, true);
  out.setUint16(34, 16, true);
  text(36, "data");
  out.setUint32(40, samples.length * 2, true);
  samples.forEach((x, i) => out.setInt16(44 + i * 2, Math.max(-1, Math.min(1, x)) * 0x7fff, true));
  return new Blob([out.buffer], { type: "audio/wav" });
}

async function useSong(blob, name) {
  setStatus(`Reading ${name}…`);
  try {
    const ext = (name.includes(".") ? name.split(".").pop() : "").toLowerCase();
    let format = FORMATS[ext] || MIME_FORMATS[(blob.type || "").split(";")[0]];
    if (!format) {
      blob = await toWav(blob);
      format = "wav";
    }
    state.song = { data: await readAsBase64(blob), format, name };
    const player = $("player");
    if (player.src) URL.revokeObjectURL(player.src);
    player.src = URL.createObjectURL(blob);
    player.hidden = false;
    const size = blob.size < 1048576 ? `${Math.ceil(blob.size / 1024)} kB` : `${(blob.size / 1048576).toFixed(1)} MB`;
    $("song-name").textContent = `${name} (${format}, ${size})`;
    resetConversation();
    setStatus("Ready: pick or write a question.");
  } catch (err) {
    setStatus(`Could not read ${name}: ${err.message || err}`);
  }
}

function setupSongInput() {
  $("file").addEventListener("change", (e) => {
    const file = e.target.files && e.target.files[0];
    if (file) useSong(file, file.name);
  });
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => {
    e.preventDefault();
    drop.classList.add("over");
  });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    const file = e.dataTransfer.files && e.dataTransfer.files[0];
    if (file) useSong(file, file.name);
  });

  const button = $("record");
  if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia || !window.MediaRecorder) {
    button.disabled = true;
    button.title = "Recording needs a browser with MediaRecorder, on https:// or localhost";
    return;
  }
  let recorder = null;
  button.addEventListener("click", async () => {
    if (recorder) {
      recorder.stop();
      return;
    }
    try {
      const stream = await navigator.mediaDevices.getUserMedia({ audio: true });
      const chunks = [];
      recorder = new MediaRecorder(stream);
      recorder.ondataavailable = (e) => chunks.push(e.data);
      recorder.onstop = async () => {
        stream.getTracks().forEach((t) => t.stop());
        button.textContent = "Record";
        button.classList.remove("recording");
        const blob = new Blob(chunks, { type: recorder.mimeType });
        recorder = null;
        await useSong(await toWav(blob), "recording.wav");
      };
      recorder.start();
      button.textContent = "Stop recording";
      button.classList.add("recording");
      setStatus("Recording… press Stop recording when done.");
    } catch (err) {
      recorder = null;
      setStatus(`Microphone unavailable: ${err.message || err}`);
    }
  });
}

// ------------------------------------------------------------------------------------------ the conversation
function resetConversation() {
  state.messages = [];
  $("turns").replaceChildren();
}

function addTurn(role, text) {
  const li = document.createElement("li");
  li.className = `turn ${role}`;
  const who = document.createElement("div");
  who.className = "who";
  who.textContent = role === "user" ? "You" : "Music Flamingo";
  li.append(who);
  const body = document.createElement("div");
  body.className = role === "user" ? "question" : "answer";
  body.textContent = text;
  li.append(body);
  $("turns").append(li);
  li.scrollIntoView({ block: "end" });
  return li;
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("apikey").value.trim();
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

async function errorText(res) {
  try {
    const body = await res.json();
    return (body.error && body.error.message) || res.statusText;
  } catch {
    return `${res.status} ${res.statusText}`;
  }
}

// Reads Server-Sent Events from a fetch response: calls onData(json) per event until [DONE].
async function readEvents(res, onData) {
  const reader = res.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        onData(JSON.parse(data));
      }
    }
  }
}

async function ask(question) {
  if (!state.song && state.messages.length === 0) {
    setStatus("Choose, drop or record a song first.");
    return;
  }
  const content = [];
  if (state.messages.length === 0 && state.song) {
    content.push({ type: "input_audio", input_audio: { data: state.song.data, format: state.song.format } });
  }
  content.push({ type: "text", text: question });
  const userMessage = { role: "user", content };
  const body = {
    model: state.model,
    messages: [...state.messages, userMessage],
    stream: true,
    stream_options: { include_usage: true },
  };
  const maxTokens = parseInt($("maxtokens").value, 10);
  if (maxTokens > 0) body.max_tokens = maxTokens;
  if ($("think").checked) body.think = true;

  addTurn("user", question);
  const turn = addTurn("assistant", "");
  const answerEl = turn.querySelector(".answer");
  answerEl.dataset.state = "streaming";
  let reasoningEl = null;
  let answer = "";
  let reasoning = "";
  let finish = null;
  state.controller = new AbortController();
  setBusy(true);
  setStatus("Thinking…");
  try {
    const res = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: headers(),
      body: JSON.stringify(body),
      signal: state.controller.signal,
    });
    if (!res.ok) throw new Error(await errorText(res));
    await readEvents(res, (chunk) => {
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.usage) {
        const u = chunk.usage;
        const usage = document.createElement("div");
        usage.className = "usage";
        usage.textContent = `${u.prompt_tokens} prompt tokens (${u.prompt_tokens_details.audio_tokens} audio), ` +
          `${u.completion_tokens} generated`;
        turn.append(usage);
      }
      const choice = chunk.choices && chunk.choices[0];
      if (!choice) return;
      const delta = choice.delta || {};
      if (delta.reasoning_content) {
        if (!reasoningEl) {
          const details = document.createElement("details");
          details.className = "reasoning";
          const summary = document.createElement("summary");
          summary.textContent = "Reasoning";
          reasoningEl = document.createElement("pre");
          details.append(summary, reasoningEl);
          turn.append(details);
        }
        reasoning += delta.reasoning_content;
        reasoningEl.textContent = reasoning;
      }
      if (delta.content) {
        answer += delta.content;
        answerEl.textContent = answer;
        setStatus("");
      }
      if (choice.finish_reason) finish = choice.finish_reason;
    });
    answerEl.dataset.state = "done";
    state.messages.push(userMessage, { role: "assistant", content: answer });
    setStatus(finish === "length" ? "The answer reached max tokens." : "");
  } catch (err) {
    answerEl.dataset.state = "error";
    answerEl.classList.add("error");
    if (err.name === "AbortError") {
      answerEl.textContent = answer + " [stopped]";
      setStatus("");
    } else {
      answerEl.textContent = answer ? `${answer}\n[${err.message}]` : err.message;
      setStatus("");
    }
  } finally {
    state.controller = null;
    setBusy(false);
  }
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
}

function setupForm() {
  $("preset").addEventListener("change", (e) => {
    if (PRESETS[e.target.value]) $("question").value = PRESETS[e.target.value];
  });
  $("ask").addEventListener("submit", (e) => {
    e.preventDefault();
    const question = $("question").value.trim() || PRESETS[$("preset").value] || "";
    if (!question) {
      setStatus("Write a question or pick one.");
      return;
    }
    $("question").value = "";
    $("preset").value = "";
    ask(question);
  });
  $("question").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) {
      e.preventDefault();
      $("ask").requestSubmit();
    }
  });
  $("stop").addEventListener("click", () => state.controller && state.controller.abort());
  $("reset").addEventListener("click", () => {
    resetConversation();
    setStatus(state.song ? "New conversation about the same song." : "");
  });
  const saved = localStorage.getItem("musicflamingo.apikey");
  if (saved) $("apikey").value = saved;
  $("apikey").addEventListener("change", (e) => localStorage.setItem("musicflamingo.apikey", e.target.value));
}

// The longest audio the server takes, as the page's header shows it: seconds below two minutes (a server with
// max_audio_seconds=20 showed "up to 0 min"), whole minutes from there on.
function audioSpan(seconds) {
  return seconds < 120 ? `${Math.round(seconds)} s` : `${Math.round(seconds / 60)} min`;
}

async function init() {
  setupSongInput();
  setupForm();
  try {
    const res = await fetch("/health");
    const health = await res.json();
    state.model = health.model;
    $("model").textContent = `${health.model} · up to ${audioSpan(health.max_audio_seconds)} of audio`;
    if (health.auth && !$("apikey").value) {
      $("settings").open = true;
      setStatus("This server needs an API key: enter it under Settings.");
    }
  } catch (err) {
    setStatus(`The server does not answer: ${err.message || err}`);
  }
}

init();
