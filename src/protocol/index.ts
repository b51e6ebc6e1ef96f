export * from './constants.js';
export * from './errors.js';
export { encodeFrame, encodeAgentFrame } from './encode.js';
export { FrameDecoder, HostFrameDecoder, MessageDecoder, type Direction } from './decode.js';
export type { AgentMessage, Bytes, ExecUser, HostMessage, TtySize } from './messages.js';
export { exitStatusToCode, type ExecHandle, type ExitStatus } from './exec-run.js';
export type { ExecOptions } from './exec-request.js';
export { AgentSession, type ConnectOptions } from './session.js';
