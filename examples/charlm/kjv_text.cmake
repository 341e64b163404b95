# Makes the training text of train_charlm: `bible -f "gen1:1-rev22:21"` (Debian's bible-kjv)
# writes the whole King James Bible, one verse a line, each line starting with a label such as
# "1Cor13:4 "; `train_charlm --strip-verse-labels` removes the labels and fails on a line without
# one. The KJV has 31102 verses: anything else means the package's output has changed.
cmake_minimum_required(VERSION 3.21)
execute_process(COMMAND ${BIBLE} -f gen1:1-rev22:21 OUTPUT_FILE ${RAW} RESULT_VARIABLE rc)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "${BIBLE} -f gen1:1-rev22:21 failed: ${rc}")
endif()
execute_process(COMMAND ${STRIP} --strip-verse-labels ${RAW} ${OUT} RESULT_VARIABLE rc ERROR_VARIABLE err)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "stripping the verse labels failed: ${err}")
endif()
string(REGEX MATCH "([0-9]+) verses" found "${err}")
if(NOT CMAKE_MATCH_1 EQUAL 31102)
  message(FATAL_ERROR "expected the 31102 verses of the KJV, got: ${err}")
endif()
string(STRIP "${err}" err)
message(STATUS "${err}")
