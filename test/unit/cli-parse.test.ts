import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import { InvalidArgumentError } from 'commander';
import { bootTimeoutFromEnv, parseIntegerIn, parseMemory } from '../../src/cli/parse.js';
import { MvmError } from '../../src/errors.js';
import { ConsoleBuffer } from '../../src/backends/console.js';

describe('--memory sizes', () => {
  test('suffixes are binary units; a bare number is MiB', () => {
    assert.equal(parseMemory('512'), 512);
    assert.equal(parseMemory('512M'), 512);
    assert.equal(parseMemory('2G'), 2048);
    assert.equal(parseMemory('1g'), 1024);
    assert.equal(parseMemory('262144K'), 256);
    assert.equal(parseMemory('1GiB'), 1024);
  });

  test('nonsense, fractions of a MiB and tiny guests are refused', () => {
    for (const bad of ['lots', '', '1.5G', '-1', '100K', '32M', '2T']) {
      assert.throws(() => parseMemory(bad), InvalidArgumentError, bad);
    }
  });
});

test('integer options are whole numbers within their range', () => {
  const cpus = parseIntegerIn(1, 64);
  assert.equal(cpus('4'), 4);
  for (const bad of ['0', '65', '1.5', 'two', '-1', '']) assert.throws(() => cpus(bad), InvalidArgumentError, bad);
});

describe('guest console buffer', () => {
  test('keeps the last lines, split across chunks, and bounds their length', () => {
    const buffer = new ConsoleBuffer();
    const seen: string[] = [];
    buffer.push(Buffer.from('first\r\nsec'), (line) => seen.push(line));
    buffer.push(Buffer.from('ond\nthird'), (line) => seen.push(line));
    assert.deepEqual(seen, ['first', 'second']);
    assert.deepEqual(buffer.tail(2), ['second', 'third']);
    buffer.push(Buffer.from('x'.repeat(10_000) + '\n'));
    assert.ok(buffer.tail(1)[0].length <= 4096);
  });

  test('a guest that prints without end cannot grow it', () => {
    const buffer = new ConsoleBuffer();
    for (let i = 0; i < 10_000; i++) buffer.push(Buffer.from(`line ${i}\n`));
    assert.equal(buffer.tail(1_000_000).length, 200);
    assert.equal(buffer.tail(1)[0], 'line 9999');
  });
});

test('MVM_BOOT_TIMEOUT: seconds, default 60, nonsense refused in one line', () => {
  const saved = process.env.MVM_BOOT_TIMEOUT;
  try {
    delete process.env.MVM_BOOT_TIMEOUT;
    assert.equal(bootTimeoutFromEnv(), 60_000);
    process.env.MVM_BOOT_TIMEOUT = '2.5';
    assert.equal(bootTimeoutFromEnv(), 2_500);
    for (const bad of ['abc', '0', '-3']) {
      process.env.MVM_BOOT_TIMEOUT = bad;
      assert.throws(() => bootTimeoutFromEnv(), MvmError, bad);
    }
  } finally {
    if (saved === undefined) delete process.env.MVM_BOOT_TIMEOUT;
    else process.env.MVM_BOOT_TIMEOUT = saved;
  }
});
