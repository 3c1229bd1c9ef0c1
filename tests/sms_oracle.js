// Twilio's segment calculator (npm sms-segments-calculator) as a line-oriented oracle for the
// tests: one JSON string a line in, one JSON object a line out, so one node process answers
// thousands of texts (tests/sms_oracle.py drives it).
"use strict";
const readline = require("readline");
const { SegmentedMessage } = require("sms-segments-calculator");

const lines = readline.createInterface({ input: process.stdin });
lines.on("line", (line) => {
  const message = new SegmentedMessage(JSON.parse(line));
  process.stdout.write(
    JSON.stringify({
      encoding: message.encodingName,
      segments: message.segmentsCount,
      graphemes: message.graphemes,
    }) + "\n",
  );
});
