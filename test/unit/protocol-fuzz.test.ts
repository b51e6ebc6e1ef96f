import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import {
  encodeAgentFrame,
  encodeFrame,
  FrameDecoder,
  HEADER_SIZE,
  HostFrameDecoder,
  MAX_PAYLOAD,
  ProtocolError,
} from '../../src/protocol/index.js';
import { agentSamples, hostSamples } from '../../soak/fuzz-inputs.js';
import { seededRandom as prng } from '../../soak/random.js';

const TIME_BUDGET_MS = 4000;

function mutate(rand: () => number, frame: Buffer): Buffer {
  const out = Buffer.from(frame);
  switch (Math.floor(rand() * 5)) {
    case 0: // flip bytes anywhere, the header included
      for (let n = 1 + Math.floor(rand() * 4); n > 0; n--) out[Math.floor(rand() * out.length)] = Math.floor(rand() * 256);
      return out;
    case 1: // truncate the payload while keeping the announced length consistent
      return fixLength(out.subarray(0, HEADER_SIZE + Math.floor(rand() * (out.length - HEADER_SIZE))));
    case 2: // trailing garbage inside the payload
      return fixLength(Buffer.concat([out, Buffer.from([Math.floor(rand() * 256)])]));
    case 3: // a random or huge announced length
      out.writeUInt32BE(rand() < 0.5 ? Math.floor(rand() * 0xffffffff) : Math.floor(rand() * 64), 0);
      return out;
    default: // a random type
      out[4] = Math.floor(rand() * 256);
      return out;
  }
}

function fixLength(frame: Buffer): Buffer {
  frame.writeUInt32BE(frame.length - HEADER_SIZE, 0);
  return frame;
}

function randomBytes(rand: () => number, n: number): Buffer {
  const out = Buffer.allocUnsafe(n);
  for (let i = 0; i < n; i++) out[i] = Math.floor(rand() * 256);
  return out;
}

/** Feeds `bytes` in random chunks; asserts only ProtocolError escapes and the buffer stays bounded. */
function feed(rand: () => number, decoder: FrameDecoder | HostFrameDecoder, bytes: Buffer): 'ok' | 'error' {
  let off = 0;
  while (off < bytes.length) {
    const n = 1 + Math.floor(rand() * Math.min(bytes.length - off, rand() < 0.5 ? 16 : 70_000));
    try {
      decoder.push(bytes.subarray(off, off + n));
    } catch (err) {
      assert.ok(err instanceof ProtocolError, `non-protocol error: ${String(err)}`);
      return 'error';
    }
    assert.ok(decoder.bufferedBytes <= HEADER_SIZE + MAX_PAYLOAD, `holds ${decoder.bufferedBytes} bytes`);
    off += n;
  }
  return 'ok';
}

describe('decoder fuzzing', () => {
  for (const direction of ['g2h', 'h2g'] as const) {
    it(`only ever throws ProtocolError and stays bounded (${direction})`, () => {
      const rand = prng(direction === 'g2h' ? 0x5eed : 0xbeef);
      const frames =
        direction === 'g2h' ? agentSamples.map(encodeAgentFrame) : hostSamples.map((m) => encodeFrame(m));
      const start = Date.now();
      let cases = 0;
      const outcomes = { ok: 0, error: 0 };
      while (cases < 4000 && Date.now() - start < TIME_BUDGET_MS) {
        const decoder = direction === 'g2h' ? new FrameDecoder() : new HostFrameDecoder();
        const parts: Buffer[] = [];
        for (let n = 1 + Math.floor(rand() * 6); n > 0; n--) {
          const frame = frames[Math.floor(rand() * frames.length)]!;
          const r = rand();
          parts.push(r < 0.4 ? frame : r < 0.9 ? mutate(rand, frame) : randomBytes(rand, Math.floor(rand() * 200)));
        }
        outcomes[feed(rand, decoder, Buffer.concat(parts))]++;
        cases++;
      }
      assert.ok(cases >= 500, `only ${cases} cases ran`);
      assert.ok(outcomes.ok > 0 && outcomes.error > 0, JSON.stringify(outcomes));
    });
  }

  it('holds at most one maximum frame while a huge payload trickles in', () => {
    const decoder = new FrameDecoder();
    const header = Buffer.alloc(HEADER_SIZE);
    header.writeUInt32BE(MAX_PAYLOAD, 0);
    header[4] = 0x81; // HELLO: a big payload is allowed through the header check
    decoder.push(header);
    const piece = Buffer.alloc(100_000, 0x41);
    let pushed = 0;
    let threw = false;
    while (pushed < MAX_PAYLOAD + 500_000 && !threw) {
      try {
        decoder.push(piece);
      } catch (err) {
        assert.ok(err instanceof ProtocolError);
        threw = true;
      }
      pushed += piece.length;
      assert.ok(decoder.bufferedBytes <= HEADER_SIZE + MAX_PAYLOAD);
    }
    assert.ok(threw, 'a 1 MiB HELLO full of 0x41 does not parse');
  });
});
