import { MvmError } from '../errors.js';
import { ErrorCode } from './constants.js';

/**
 * A frame that breaks the wire format, or a well-formed message the session did not expect at that
 * point. The guest is untrusted, so this always ends the session.
 */
export class ProtocolError extends MvmError {
  constructor(message: string) {
    super(`guest agent protocol error: ${message}`);
    this.name = 'ProtocolError';
  }
}

/** A value the protocol cannot carry (NUL in a string, argv empty, out-of-range number); nothing was sent. */
export class InvalidRequestError extends MvmError {
  constructor(message: string) {
    super(message);
    this.name = 'InvalidRequestError';
  }
}

/** The connection to the agent is gone: closed, failed, timed out or aborted. */
export class AgentConnectionError extends MvmError {
  constructor(message: string, options?: { cause?: unknown }) {
    super(message);
    this.name = 'AgentConnectionError';
    if (options && 'cause' in options) this.cause = options.cause;
  }
}

/** The agent did not answer a request within the session's deadline; the session has ended. */
export class AgentTimeoutError extends AgentConnectionError {
  constructor(message: string) {
    super(message);
    this.name = 'AgentTimeoutError';
  }
}

/** The session was ended through an AbortSignal; `cause` is the signal's reason. */
export class SessionAbortedError extends AgentConnectionError {
  constructor(reason: unknown) {
    super('guest agent session aborted', { cause: reason });
    this.name = 'SessionAbortedError';
  }
}

/** The agent and the host speak different protocol versions. */
export class AgentVersionError extends MvmError {
  constructor(message: string) {
    super(message);
    this.name = 'AgentVersionError';
  }
}

/** The agent answered a request with ERROR; `message` is the agent's text, unchanged. */
export class AgentRequestError extends MvmError {
  constructor(
    readonly code: number,
    readonly fatal: boolean,
    message: string,
  ) {
    super(message);
    this.name = 'AgentRequestError';
  }
}

/** A terminal was asked for, and the image's agent is older than TTY support (it would refuse the EXEC). */
export class TtyUnavailableError extends MvmError {
  constructor(agentVersion: string) {
    super(`this image's guest agent (${agentVersion}) cannot give a command a terminal: rebuild the image or template with this mvmctl, or run without -t`);
    this.name = 'TtyUnavailableError';
  }
}

/** The image's agent was built without the dev shell, so it runs no commands. */
export class ExecUnavailableError extends AgentRequestError {
  constructor(message: string) {
    super(ErrorCode.EXEC_UNAVAILABLE, false, message);
    this.name = 'ExecUnavailableError';
  }
}
