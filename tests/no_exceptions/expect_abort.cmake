# Runs the -fno-exceptions program with a bad call: it must fail (abort) and print the message
# the exception would have carried.
execute_process(COMMAND ${EXE} bad RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
if(rc EQUAL 0)
  message(FATAL_ERROR "the bad call did not abort (exit 0); stdout: ${out}")
endif()
if(NOT err MATCHES "polyattn::flash_attention: .*'out'")
  message(FATAL_ERROR "the abort did not print the argument error; rc ${rc}, stderr: ${err}")
endif()
if(out MATCHES "not reached")
  message(FATAL_ERROR "the bad call returned")
endif()
