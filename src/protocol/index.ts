export * from './constants.js';
export * from './errors.js';
export {
  encodeFrame,
  encodeAgentFrame,
  FrameDecoder,
  HostFrameDecoder,
  MessageDecoder,
  type AgentMessage,
  type Bytes,
  type Direction,
  type ExecUser,
  type HostMessage,
  type TtySize,
} from './codec.js';
export {
  AgentSession,
  exitStatusToCode,
  type ConnectOptions,
  type ExecHandle,
  type ExecOptions,
  type ExitStatus,
} from './session.js';
