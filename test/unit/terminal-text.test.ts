import assert from 'node:assert/strict';
import { test } from 'node:test';
import { terminalSafe } from '../../src/cli/terminal-text.js';

test('terminalSafe writes control characters and bidi overrides out as escapes, and leaves text and tabs', () => {
  assert.equal(terminalSafe('plain\ttext, ünïcødé 名前 \\x1b'), 'plain\ttext, ünïcødé 名前 \\x1b');
  assert.equal(terminalSafe('\x1b]0;title\x07\x1b[2J'), '\\x1b]0;title\\x07\\x1b[2J');
  assert.equal(terminalSafe('line\nfake line\rover'), 'line\\x0afake line\\x0dover');
  assert.equal(terminalSafe('\x00\x7f\x9b'), '\\x00\\x7f\\x9b', 'NUL, DEL and the 8-bit CSI');
  assert.equal(terminalSafe('abc\u202edcba\u2066'), 'abc\\u202edcba\\u2066');
  assert.equal(terminalSafe(terminalSafe('\x1b[31m')), terminalSafe('\x1b[31m'), 'escaping twice changes nothing more');
});
