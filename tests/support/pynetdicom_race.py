"""Importing this mends a race in pynetdicom (seen with 3.0.4) for the test clients.

A requestor's `send_c_store` (and `send_c_find`, `send_c_get`, `send_c_move`) pauses the
association's reactor thread by clearing a checkpoint, then waits until the reactor has set its
"paused" flag. The reactor sets that flag *before* it waits on the checkpoint, so when it had just
passed the checkpoint it goes on, takes the peer's response off the DIMSE queue, logs "Received
unexpected C-STORE service message" and drops it. The sender then waits out its DIMSE timeout and
aborts, although the receiver answered. Seen under load in about one run in four of 16 senders x
625 C-STOREs: the node's log showed the response sent, pynetdicom's the response dropped.

A response the reactor takes while a send waits for one (the checkpoint is cleared) goes back on
the queue, where the waiting send finds it.
"""
import logging

from pynetdicom.association import Association

_serve_request = Association._serve_request


def _serve_request_keeping_responses(self, msg, context_id):
    if msg is not None and not msg.is_valid_request and not self._reactor_checkpoint.is_set():
        logging.getLogger("pynetdicom_race").warning(
            "the reactor took a %s response; put back for the waiting request", msg.msg_type
        )
        self.dimse.msg_queue.put((context_id, msg))
        return
    _serve_request(self, msg, context_id)


Association._serve_request = _serve_request_keeping_responses
